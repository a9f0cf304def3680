"""The allocation trace of a row's steps, replayed through the caching allocator model (gpipe_bench.memory.reserved)."""

from __future__ import annotations

from typing import List

import pytest
import torch
from torch import nn

from gpipe_bench.errors import HarnessError
from gpipe_bench.memory.allocator import ERA_1_3, AllocatorSettings
from gpipe_bench.memory.predict import predict_pipeline, predict_plain, profile
from gpipe_bench.memory.reserved import (
    CUBLAS_WORKSPACE,
    CellTrace,
    ModelState,
    Setup,
    allocator_for,
    replay_steps,
    settings_for,
)
from gpipe_bench.perf import checkpoint_stop

MIB = 1 << 20


def _cell() -> CellTrace:
    """A forward keeping 3 MiB; its backward makes a 1000-byte parameter gradient and frees the 3 MiB."""
    return CellTrace(
        nograd=((1, 3 * MIB), (1, -1), (2, 100)),
        out=(2,),
        forward=((1, 3 * MIB),),
        backward=((3, 1000), (1, -1)),
        grad_in=(),
        param_grads=(3,),
        sizes={2: 100, 3: 1000},
    )


def test_a_hand_made_step_reserves_what_the_rules_give() -> None:
    # Era 1.3: no cuBLAS workspace in the allocator, RMSprop one parameter at a time.
    # Parameters 4 MiB: a 20 MiB segment, split. Forward 3 MiB from its rest; the gradient (1000 B)
    # takes a 2 MiB small segment. square_avg (4 MiB) and the temporary fit the large segment's rest.
    setup = Setup(AllocatorSettings(era=ERA_1_3))
    result = replay_steps([[_cell()]], 0, ModelState([[4 * MIB]]), setup)
    assert result.peak_reserved == [22 * MIB]
    assert result.model_bytes == [12 * MIB]
    # The peak allocated: parameters, square_avg, the temporary and the gradient's 1024-byte block.
    assert result.peak_allocated == [12 * MIB + 1024]
    assert result.stats[0].peak_requested == 12 * MIB + 1000


def test_reserved_is_never_below_allocated_and_one_rounded_tensor_reserves_itself() -> None:
    alone = CellTrace(
        nograd=(), out=(), forward=((1, 40 * MIB),), backward=((1, -1),), grad_in=(), param_grads=(), sizes={}
    )
    result = replay_steps([[alone]], 0, ModelState([[]]), Setup(AllocatorSettings(era=ERA_1_3), steps=1))
    assert result.peak_reserved == result.peak_allocated == [40 * MIB]
    many = replay_steps([[_cell()]] * 4, 4, ModelState([[4 * MIB]]), Setup(AllocatorSettings()))
    assert all(r >= a for r, a in zip(many.peak_reserved, many.peak_allocated))


def test_todays_step_holds_two_gradient_sets_and_the_sum_at_the_second_micro_batch() -> None:
    big = CellTrace(
        nograd=(),
        out=(),
        forward=((1, 1 * MIB),),
        backward=((3, 30 * MIB), (1, -1)),
        grad_in=(),
        param_grads=(3,),
        sizes={3: 30 * MIB},
    )
    setup_now, setup_then = (
        Setup(AllocatorSettings(), steps=1, foreach=False),
        Setup(AllocatorSettings(era=ERA_1_3), steps=1),
    )
    now = replay_steps([[big]] * 2, 0, ModelState([[MIB]]), setup_now)
    then = replay_steps([[big]] * 2, 0, ModelState([[MIB]]), setup_then)
    # Today's engine sums the second set out of place: three 30 MiB sets at once, beside the
    # parameters and two cuBLAS workspaces (forward and backward handles); autograd (1.3) adds in
    # place: two sets while the second micro-batch's activations are still held.
    assert now.stats[0].peak_requested == MIB + 3 * 30 * MIB + 2 * CUBLAS_WORKSPACE["pre-hopper"]
    assert then.stats[0].peak_requested == MIB + 2 * 30 * MIB + MIB


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).to("meta")


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
def test_repeated_phases_by_their_net_effect_match_the_full_replay(checkpoint: str) -> None:
    model = _model()
    parts = [model[:4], model[4:]]
    x = torch.empty(8, 3, 64, 64, device="meta")
    costs = profile(parts, (x[:1],), True)
    traces: List[List[CellTrace]] = [[c.trace for c in costs if c.trace is not None]] * 8
    params = ModelState([[p.numel() * 4 for p in part.parameters()] for part in parts])
    stop = checkpoint_stop(checkpoint, 8)
    full = replay_steps(traces, stop, params, Setup(AllocatorSettings()), repeats=False)
    fast = replay_steps(traces, stop, params, Setup(AllocatorSettings()), repeats=True)
    for a, b in zip(full.peak_reserved, fast.peak_reserved):
        assert b == pytest.approx(a, rel=0.02)
    for a, b in zip(full.peak_allocated, fast.peak_allocated):
        assert b == pytest.approx(a, rel=0.02)


def test_predictions_carry_reserved_on_request_and_only_for_fp32_traces() -> None:
    model = _model()
    x = torch.empty(8, 3, 32, 32, device="meta")
    setup = Setup(AllocatorSettings())
    plain = predict_plain(model, x, allocator=setup)
    assert plain.reserved is not None and plain.allocated is not None
    assert plain.reserved[0] >= plain.allocated[0] > 0
    assert "today's CUDA caching allocator" in plain.allocator
    pipe = predict_pipeline(model, [4, 5], x, chunks=4, checkpoint="except_last", allocator=setup)
    assert pipe.reserved is not None and len(pipe.reserved) == 2
    assert predict_pipeline(model, [4, 5], x, chunks=4, checkpoint="except_last").reserved is None
    bf16 = predict_pipeline(model, [4, 5], x, chunks=4, checkpoint="except_last", allocator=setup, precision="bf16")
    assert bf16.reserved is None  # autocast cells are profiled on fake tensors, without a trace


def test_settings_follow_the_environment_today_and_nothing_in_1_3() -> None:
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert settings_for("current", env).expandable_segments
    assert settings_for("current", env).conf == "expandable_segments:True"
    assert not settings_for("1.3", env).expandable_segments
    with pytest.raises(ValueError, match="max_split_size_mb:5"):
        settings_for("current", {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:5"})


def test_rows_without_a_gpu_do_not_read_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    assert allocator_for("current", ["cpu:0", "cpu:1"]) is None  # a CPU plan or table is not refused
    with pytest.raises(HarnessError, match="only the native caching allocator is modelled"):
        allocator_for("current", ["cuda:0"])
    assert allocator_for("1.3", ["cuda:0"]) == AllocatorSettings(era=ERA_1_3)
