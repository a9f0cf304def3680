"""Tests of gpipe_bench.pipe.batchnorm: DeferredBatchNorm through GPipe(deferred_batch_norm=True).

The running statistics after each training step must be those of a plain
BatchNorm fed the whole mini-batch, whatever the number of micro-batches, the
checkpoint mode (a recompute must not count twice) and the momentum.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

from gpipe_bench.pipe import GPipe
from gpipe_bench.pipe.batchnorm import DeferredBatchNorm

F64 = torch.float64
RTOL = 1e-10


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """CPU batch_norm opens an OpenMP region even for tiny tensors; on a busy 2-core host
    waking the second thread costs milliseconds per call. One intra-op thread keeps the
    module fast (the engine's results do not depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Affine(nn.Module):
    """A per-channel affine map: the same on micro-batches as on the whole batch."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(channels, dtype=F64) + 0.5)
        self.b = nn.Parameter(torch.randn(channels, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.w.view(shape) + self.b.view(shape)


def _bn(kind: str, channels: int, momentum: Optional[float]) -> nn.Module:
    cls = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d}[kind]
    return cls(channels, momentum=momentum).to(F64)


def _input(kind: str, batch: int, channels: int) -> Tensor:
    # Spatial extent > 1 so that a micro-batch of one sample still has several values per channel.
    shape = (batch, channels, 3) if kind == "1d" else (batch, channels, 2, 3)
    return (torch.randn(*shape, dtype=F64) * 3 + 1.5).requires_grad_()


def _models(
    kind: str, momentum: Optional[float], layout: str, chunks: int, checkpoint: str
) -> Tuple[nn.Sequential, GPipe]:
    """A plain model and its GPipe with deferred BatchNorm (same initial tensors)."""
    # One BatchNorm only: a second one would be fed micro-batch-normalised data,
    # which differs from the plain model's input by design.
    channels = 3
    if layout == "one":
        plain = nn.Sequential(_bn(kind, channels, momentum), Affine(channels))
        balance, devices = [2], ["cpu"]
    else:
        # Affine first, BatchNorm in the next partition: its input is identical.
        plain = nn.Sequential(Affine(channels), _bn(kind, channels, momentum))
        balance = [1, 1]
        devices = ["cpu:0", "cpu:1"] if layout == "two-workers" else ["cpu", "cpu"]
    gpipe = GPipe(
        copy.deepcopy(plain), balance, devices=devices, chunks=chunks, checkpoint=checkpoint, deferred_batch_norm=True
    )
    return plain, gpipe


def _bn_layers(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _assert_same_stats(gpipe: nn.Module, plain: nn.Module) -> None:
    ours, theirs = _bn_layers(gpipe), _bn_layers(plain)
    assert len(ours) == len(theirs) == 1
    for a, b in zip(ours, theirs):
        assert isinstance(a, DeferredBatchNorm)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked)
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=RTOL, atol=1e-14)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("checkpoint", ["never", "except_last", "always"])
@pytest.mark.parametrize("layout", ["one", "two", "two-workers"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 5])
def test_running_stats_equal_whole_batch(
    chunks: int, kind: str, momentum: Optional[float], layout: str, checkpoint: str
) -> None:
    torch.manual_seed(chunks)
    plain, gpipe = _models(kind, momentum, layout, chunks, checkpoint)
    # Divisible, indivisible and smaller-than-chunks batches, one per step.
    for step, batch in enumerate([8, 7, 3]):
        x = _input(kind, batch, 3)
        y_plain = plain(x)
        y = gpipe(x)
        # Backward runs the recompute of checkpointed micro-batches: it must not count again.
        y.sum().backward()
        y_plain.sum().backward()
        _assert_same_stats(gpipe, plain)
        if step == 0:
            bn = _bn_layers(gpipe)[0]
            assert int(bn.num_batches_tracked) == 1
        if chunks == 1:
            # One micro-batch: the very same computation as the plain model.
            torch.testing.assert_close(y, y_plain, rtol=RTOL, atol=1e-12)
    assert int(_bn_layers(gpipe)[0].num_batches_tracked) == 3


@pytest.mark.parametrize("checkpoint", ["never", "always"])
def test_forward_without_backward_counts_once(checkpoint: str) -> None:
    torch.manual_seed(0)
    plain, gpipe = _models("2d", 0.1, "two-workers", 4, checkpoint)
    for batch in (8, 5):
        x = _input("2d", batch, 3)
        plain(x)
        gpipe(x)
    _assert_same_stats(gpipe, plain)


def test_training_under_no_grad_updates_like_plain() -> None:
    torch.manual_seed(0)
    plain, gpipe = _models("1d", 0.1, "one", 3, "always")
    x = _input("1d", 7, 3)
    with torch.no_grad():
        plain(x)
        gpipe(x)
    _assert_same_stats(gpipe, plain)


def test_float32_close_to_whole_batch() -> None:
    # The pairwise merge keeps float32 variance close to a one-shot computation.
    torch.manual_seed(0)
    plain = nn.Sequential(nn.BatchNorm1d(4))
    gpipe = GPipe(copy.deepcopy(plain), [1], devices=["cpu"], chunks=4, deferred_batch_norm=True)
    x = torch.randn(10, 4, 5) * 100 + 1000
    plain(x)
    gpipe(x)
    (a,), (b,) = _bn_layers(gpipe), _bn_layers(plain)
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("layout", ["one", "two-workers"])
def test_eval_uses_running_stats_and_changes_nothing(layout: str) -> None:
    torch.manual_seed(0)
    plain, gpipe = _models("2d", 0.1, layout, 3, "always")
    for batch in (6, 5):
        x = _input("2d", batch, 3)
        plain(x)
        gpipe(x).sum().backward()
    _assert_same_stats(gpipe, plain)

    plain.eval()
    gpipe.eval()
    before = {k: v.clone() for k, v in gpipe.state_dict().items()}
    x = _input("2d", 7, 3)
    y = gpipe(x)
    y.sum().backward()
    # Running statistics normalise every micro-batch: the output is the plain model's.
    torch.testing.assert_close(y, plain(x), rtol=RTOL, atol=1e-12)
    after = gpipe.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    _assert_same_stats(gpipe, plain)


def test_plain_batchnorm_not_double_counted_by_recompute() -> None:
    # Without deferred_batch_norm each micro-batch updates the statistics once
    # (as a plain BatchNorm fed the micro-batches one by one), recompute or not.
    torch.manual_seed(0)
    plain = nn.Sequential(Affine(3), _bn("2d", 3, 0.1))
    gpipe = GPipe(copy.deepcopy(plain), [1, 1], devices=["cpu:0", "cpu:1"], chunks=3, checkpoint="always")
    assert not any(isinstance(m, DeferredBatchNorm) for m in gpipe.modules())
    x = _input("2d", 6, 3)
    gpipe(x).sum().backward()
    for piece in x.chunk(3):
        plain(piece)
    (a,), (b,) = _bn_layers(gpipe), _bn_layers(plain)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 3
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=RTOL, atol=1e-14)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=RTOL, atol=1e-14)


def test_state_dict_keys() -> None:
    plain = nn.Sequential(
        nn.Conv2d(2, 3, 1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)),
        nn.BatchNorm2d(3, affine=False),
    )
    expected_plain = list(copy.deepcopy(plain).state_dict().keys())
    balance = [2, 2, 1]
    gpipe = GPipe(plain, balance, devices=["cpu", "cpu", "cpu"], chunks=2, deferred_batch_norm=True)
    assert sum(isinstance(m, DeferredBatchNorm) for m in gpipe.modules()) == 3

    partition_of = {}
    k = 0
    for j, size in enumerate(balance):
        for _ in range(size):
            partition_of[str(k)] = j
            k += 1
    expected = [f"partitions.{partition_of[key.split('.')[0]]}.{key}" for key in expected_plain]
    assert list(gpipe.state_dict().keys()) == expected

    # Loading the plain model's state dict back (keys mapped) works strictly.
    state = {f"partitions.{partition_of[key.split('.')[0]]}.{key}": v for key, v in plain.state_dict().items()}
    gpipe.load_state_dict(state, strict=True)


def test_convert_shares_tensors() -> None:
    bn = nn.BatchNorm2d(3, momentum=0.3, eps=1e-3).to(F64)
    bn.running_mean.fill_(0.5)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(bn, nn.ReLU()))
    model.eval()
    converted = DeferredBatchNorm.convert_deferred_batch_norm(model, chunks=4)
    deferred = converted[1][0]
    assert isinstance(deferred, DeferredBatchNorm)
    assert isinstance(converted[0], nn.Conv2d) and isinstance(converted[1][1], nn.ReLU)
    assert deferred.weight is bn.weight
    assert deferred.bias is bn.bias
    assert deferred.running_mean is bn.running_mean
    assert deferred.running_var is bn.running_var
    assert deferred.num_batches_tracked is bn.num_batches_tracked
    assert deferred.momentum == 0.3 and deferred.eps == 1e-3 and deferred.chunks == 4
    assert not deferred.training
    assert deferred.acc_mean.dtype == F64
    # The parameters of the converted model are the original ones.
    assert {id(p) for p in converted.parameters()} >= {id(bn.weight), id(bn.bias)}


def test_convert_leaves_non_tracking_batchnorm() -> None:
    bn = nn.BatchNorm1d(3, track_running_stats=False)
    assert DeferredBatchNorm.convert_deferred_batch_norm(bn) is bn
    deferred = DeferredBatchNorm(3)
    assert DeferredBatchNorm.convert_deferred_batch_norm(deferred) is deferred


def test_deferred_batch_norm_flag_off_keeps_plain() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    gpipe = GPipe(model, [1], devices=["cpu"], chunks=2)
    assert type(gpipe[0]) is nn.BatchNorm1d


# Regression (fixed): the forward ordered only the last partition's device after the workers
# before committing, so on two GPUs a commit on the first ran on the caller's stream while that
# GPU's worker could still be accumulating (CUDA half: tests/pipe/test_cuda.py).
def test_commit_comes_after_every_device_is_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpipe_bench.pipe.pipeline import Pipeline

    events: List[Tuple[str, object]] = []
    join, commit = Pipeline._join_caller, DeferredBatchNorm.commit

    def joining(places: List[torch.device], ready: List[object]) -> None:
        events.append(("join", frozenset(places)))
        join(places, ready)  # type: ignore[arg-type]

    def committing(self: DeferredBatchNorm) -> None:
        events.append(("commit", None))
        commit(self)

    monkeypatch.setattr(Pipeline, "_join_caller", staticmethod(joining))
    monkeypatch.setattr(DeferredBatchNorm, "commit", committing)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3))
    gpipe = GPipe(model, [2, 2], devices=["cpu:0", "cpu:1"], chunks=2, deferred_batch_norm=True)
    gpipe(torch.randn(4, 3))
    first_commit = events.index(("commit", None))
    joined = set().union(*(places for kind, places in events[:first_commit] if kind == "join"))  # type: ignore[arg-type]
    assert set(gpipe._pipeline.places) <= joined
