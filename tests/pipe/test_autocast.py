"""GPipe under mixed precision: the same step as the plain model under the same autocast, on a CPU.

The workers take the caller's autocast state (pipeline._ThreadState), and so
does a checkpointed micro-batch's recompute: it must replay the forward's
bfloat16 arithmetic, not run in float32. Bounds come from the dtype: torch's
own tolerances for bfloat16 (torch.testing's defaults), since the workers run
with fewer intra-op threads than the caller and may sum in another order.
The gradient scaler's skipped step when one micro-batch overflows in fp16
is checked against the plain model too.
"""

from __future__ import annotations

import copy
from typing import List, Tuple

import pytest
import torch
from torch import Tensor, nn

from gpipe_bench.pipe import GPipe
from helpers import run_micro_batches

BF16 = {"rtol": 1.6e-2, "atol": 1e-5}  # torch.testing.assert_close's defaults for bfloat16


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 8),
        nn.ReLU(),
        nn.Linear(8, 4),
    )


def _grads(model: nn.Module) -> List[Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _pipeline_step(model: nn.Module, x: Tensor, weight: Tensor) -> Tuple[Tensor, List[Tensor], Tensor]:
    leaf = x.clone().requires_grad_(True)
    out = model(leaf)
    (out * weight).sum().backward()
    assert leaf.grad is not None
    return out.detach(), _grads(model), leaf.grad


@pytest.mark.parametrize("checkpoint", ["never", "except_last", "always"])
@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu:0", "cpu:1"]])
def test_the_pipeline_equals_the_plain_model_under_the_same_bf16_autocast(checkpoint: str, devices: List[str]) -> None:
    torch.manual_seed(0)
    plain = _model()
    piped = GPipe(copy.deepcopy(plain), [3, 4], devices=devices, chunks=4, checkpoint=checkpoint)
    x, weight = torch.randn(16, 8), torch.randn(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        leaf = x.clone().requires_grad_(True)
        expected = run_micro_batches(plain, leaf, weight, 4)
        out, grads, input_grad = _pipeline_step(piped, x, weight)
    assert out.dtype == expected.dtype == torch.bfloat16  # the last Linear ran in bf16 on every worker
    torch.testing.assert_close(out, expected, **BF16)
    assert leaf.grad is not None
    torch.testing.assert_close(input_grad, leaf.grad, **BF16)
    for ours, theirs in zip(grads, _grads(plain), strict=True):
        torch.testing.assert_close(ours, theirs, **BF16)


def test_a_recompute_replays_the_forwards_autocast_state() -> None:
    """Checkpointing every micro-batch gives exactly the never-checkpointed step under autocast (one worker)."""
    torch.manual_seed(1)
    base = _model()
    x, weight = torch.randn(12, 8), torch.randn(12, 4)
    results = {}
    for checkpoint in ("never", "always"):
        piped = GPipe(copy.deepcopy(base), [3, 4], devices=["cpu", "cpu"], chunks=3, checkpoint=checkpoint)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[checkpoint] = _pipeline_step(piped, x, weight)
    (out_n, grads_n, in_n), (out_a, grads_a, in_a) = results["never"], results["always"]
    assert torch.equal(out_n, out_a) and torch.equal(in_n, in_a)
    assert all(torch.equal(a, b) for a, b in zip(grads_n, grads_a, strict=True))
    # The check can fail: a recompute in float32 would have given other gradients.
    fp32 = GPipe(copy.deepcopy(base), [3, 4], devices=["cpu", "cpu"], chunks=3, checkpoint="never")
    _, grads_32, _ = _pipeline_step(fp32, x, weight)
    assert not all(torch.equal(a, b) for a, b in zip(grads_n, grads_32, strict=True))


def _scaled_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: Tensor, chunks: int = 1
) -> None:
    """One fp16 step with a gradient scaler, the loss of each of ``chunks`` pieces of ``x`` backpropagated apart.

    The plain model on micro-batches takes ``chunks`` pieces (GPipe's definition); the pipeline takes one.
    """
    optimizer.zero_grad()
    for piece in x.chunk(chunks):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(piece).float().sum()
        scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def _both_scaled(plain: nn.Module, piped: nn.Module, x: Tensor) -> List[Tuple[bool, float]]:
    """(parameters unchanged, scale after) of one scaled step of the plain model on 4 micro-batches and of the pipeline."""
    out = []
    for model, chunks in ((plain, 4), (piped, 1)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        before = [p.detach().clone() for p in model.parameters()]
        _scaled_step(model, optimizer, scaler, x, chunks)
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        out.append((unchanged, scaler.get_scale()))
    return out


def test_a_gradient_scaler_skips_the_step_when_one_micro_batch_overflows_as_on_the_plain_model() -> None:
    torch.manual_seed(2)
    # No saturating layer: the large sample's gradient reaches the first layer's weights.
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(8, 8)
    x[5] = 1.0e6  # one sample of the second of four micro-batches: beyond fp16's range once scaled
    plain, piped_model = copy.deepcopy(base), copy.deepcopy(base)
    piped = GPipe(piped_model, [2, 3], devices=["cpu:0", "cpu:1"], chunks=4)
    runs = _both_scaled(plain, piped, x)
    assert runs[0] == runs[1] == (True, 2.0**7)  # both skipped the step and halved the scale
    # Without the overflow both take the step and keep the scale.
    x[5] = 1.0
    clean = [scale for _, scale in _both_scaled(plain, piped, x)]
    assert clean == [2.0**8, 2.0**8]
    for a, b in zip(plain.parameters(), piped_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
