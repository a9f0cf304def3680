"""Tests of gpipe_bench.pipe.checkpoint: the checkpointing/recomputing flags, RNG replay,
and checkpointing as GPipe schedules it (which micro-batches, when the recompute runs)."""

from __future__ import annotations

import threading
import traceback
from collections import Counter
from typing import Callable, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpipe_bench.pipe import GPipe, is_checkpointing, is_recomputing
from gpipe_bench.pipe.checkpoint import RNGState, checkpointing, recomputing

DEVICES = [
    pytest.param(["cpu"], id="cpu-one-partition"),
    pytest.param(["cpu", "cpu"], id="cpu"),
    pytest.param(["cpu:0", "cpu:1"], id="cpu0-cpu1"),
]

# Regression (fixed): with several CPU workers only partitions holding nn.Dropout/nn.RReLU modules
# take CPU_RNG_LOCK; a layer that draws random numbers otherwise (F.dropout in a custom module,
# nn.MultiheadAttention(dropout=p), torch.rand) draws concurrently with another partition, so the
# RNG state saved for its recompute is not the one its forward used and the recomputed dropout
# mask differs from the forward mask (gradients inconsistent with the output)


def _balance(devices: List[str], layers: int) -> List[int]:
    """All layers in one partition on a single device, else split evenly over two."""
    return [layers] if len(devices) == 1 else [layers // 2, layers - layers // 2]


# -- the flags and the RNG state -------------------------------------------


def test_flags_default_false() -> None:
    assert not is_checkpointing()
    assert not is_recomputing()


def test_flags_nest_and_restore() -> None:
    with checkpointing():
        assert is_checkpointing() and not is_recomputing()
        with checkpointing():
            assert is_checkpointing()
        assert is_checkpointing()
    assert not is_checkpointing()
    with recomputing():
        assert is_recomputing() and not is_checkpointing()
    assert not is_recomputing()


def test_flags_restored_after_exception() -> None:
    with pytest.raises(ZeroDivisionError):
        with checkpointing(), recomputing():
            _ = 1 / 0
    assert not is_checkpointing()
    assert not is_recomputing()


def test_flags_are_thread_local() -> None:
    seen: List[Tuple[bool, bool]] = []
    with checkpointing(), recomputing():
        t = threading.Thread(target=lambda: seen.append((is_checkpointing(), is_recomputing())))
        t.start()
        t.join()
    assert seen == [(False, False)]


def test_rng_state_replay() -> None:
    torch.manual_seed(0)
    state = RNGState(torch.device("cpu"))
    first = torch.rand(8)
    after_first = torch.rand(8)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    with state.replay():
        again = torch.rand(8)
    assert torch.equal(first, again)
    # The current generator is put back as it was.
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(torch.rand(8), after_first)


# -- which micro-batches are checkpointed ------------------------------------


class Recorder(nn.Module):
    """Logs (partition, micro-batch, is_checkpointing(), is_recomputing()) per call.

    Column 0 of the input holds the micro-batch index (one row per micro-batch),
    and the layer multiplies by a parameter equal to one, so it passes through.
    """

    def __init__(self, j: int, log: List[Tuple[int, int, bool, bool]]) -> None:
        super().__init__()
        self.j = j
        self.log = log
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        i = int(x[0, 0].item())
        self.log.append((self.j, i, is_checkpointing(), is_recomputing()))
        return x * self.w


def _recorded_model(
    devices: List[str], chunks: int, checkpoint: str
) -> Tuple[GPipe, List[Tuple[int, int, bool, bool]]]:
    log: List[Tuple[int, int, bool, bool]] = []
    model = nn.Sequential(Recorder(0, log), Recorder(1, log))
    return GPipe(model, _balance(devices, 2), devices=devices, chunks=chunks, checkpoint=checkpoint), log


def _indexed_input(m: int) -> Tensor:
    return torch.arange(m, dtype=torch.float64).view(m, 1).repeat(1, 3).requires_grad_()


@pytest.mark.parametrize("devices", DEVICES)
@pytest.mark.parametrize("checkpoint,stop", [("always", 4), ("except_last", 3), ("never", 0)])
def test_checkpoint_modes(devices: List[str], checkpoint: str, stop: int) -> None:
    model, log = _recorded_model(devices, 4, checkpoint)
    x = _indexed_input(4)
    y = model(x)

    forward = Counter(log)
    expected_forward = Counter({(j, i, i < stop, False): 1 for i in range(4) for j in range(2)})
    assert forward == expected_forward
    log.clear()

    y.sum().backward()
    recompute = Counter(log)
    assert recompute == Counter({(j, i, False, True): 1 for i in range(stop) for j in range(2)})
    assert torch.equal(x.grad, torch.ones_like(x))
    # The caller's thread is left clean.
    assert not is_checkpointing() and not is_recomputing()


@pytest.mark.parametrize("devices", DEVICES)
def test_nothing_checkpointed_in_eval(devices: List[str]) -> None:
    model, log = _recorded_model(devices, 4, "always")
    model.eval()
    x = _indexed_input(4)
    model(x).sum().backward()
    assert Counter(log) == Counter({(j, i, False, False): 1 for i in range(4) for j in range(2)})
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("devices", DEVICES)
def test_nothing_checkpointed_under_no_grad(devices: List[str]) -> None:
    model, log = _recorded_model(devices, 4, "always")
    assert model.training
    with torch.no_grad():
        y = model(_indexed_input(4))
    assert not y.requires_grad
    assert Counter(log) == Counter({(j, i, False, False): 1 for i in range(4) for j in range(2)})


@pytest.mark.parametrize("devices", DEVICES)
def test_except_last_with_one_chunk_checkpoints_nothing(devices: List[str]) -> None:
    model, log = _recorded_model(devices, 1, "except_last")
    model(_indexed_input(1)).sum().backward()
    assert Counter(log) == Counter({(0, 0, False, False): 1, (1, 0, False, False): 1})


# -- dropout masks are replayed --------------------------------------------


class Scale(nn.Module):
    """Elementwise product with a weight: a diagonal Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(width, dtype=torch.float64) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


def _check_masks_consistent(model: GPipe, w0: Tensor, w1: Tensor, repeats: int = 5) -> None:
    """output = drop(drop(x) * w0) * w1: x.grad must carry the mask seen in the output."""
    scale = 1 / (0.5 * 0.5)
    for _ in range(repeats):
        x = (torch.rand(8, 16, dtype=torch.float64) + 1).requires_grad_()
        g = torch.rand(8, 16, dtype=torch.float64) + 1
        y = model(x)
        mask = (y != 0).to(torch.float64)
        # Both partitions dropped something, and not everything.
        assert 0 < mask.mean() < 0.5
        torch.testing.assert_close(y, x.detach() * mask * w0 * w1 * scale, rtol=1e-10, atol=0)
        y.backward(g)
        assert torch.equal(x.grad != 0, mask != 0)
        torch.testing.assert_close(x.grad, g * mask * w0 * w1 * scale, rtol=1e-10, atol=0)


@pytest.mark.parametrize("devices", DEVICES)
@pytest.mark.parametrize("checkpoint", ["always", "except_last"])
def test_dropout_mask_replayed(devices: List[str], checkpoint: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), Scale(16), nn.Dropout(0.5), Scale(16))
    w0, w1 = model[1].w.detach().clone(), model[3].w.detach().clone()
    gpipe = GPipe(model, _balance(devices, 4), devices=devices, chunks=4, checkpoint=checkpoint)
    _check_masks_consistent(gpipe, w0, w1)


class FunctionalDropout(nn.Module):
    """Dropout by F.dropout, not an nn.Dropout module (as nn.MultiheadAttention does it).

    ``before``/``after`` run around the draw of the first forward (not the recompute),
    with the call number, to order draws of partitions running at the same time.
    """

    def __init__(
        self,
        before: Optional[Callable[[int], None]] = None,
        after: Optional[Callable[[int], None]] = None,
    ) -> None:
        super().__init__()
        self.before, self.after = before, after
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        first = not is_recomputing()
        if first and self.before:
            self.before(self.calls)
        y = F.dropout(x, 0.5, self.training)
        if first and self.after:
            self.after(self.calls)
        if first:
            self.calls += 1
        return y


def test_functional_dropout_mask_replayed_on_cpu_workers() -> None:
    # Make the draws of the two partitions interleave deterministically. Cells
    # (i+1, 0) and (i, 1) run in the same clock; the engine saves each cell's RNG
    # state before running its layers. Partition 0 draws only once partition 1 has
    # started its layers (so its state is saved), and partition 1 draws only once
    # partition 0 has drawn. Each wait has a timeout, so an engine that serialises
    # the two cells still passes, only slower.
    torch.manual_seed(0)
    chunks = 2
    started = [threading.Event() for _ in range(chunks)]
    drew = [threading.Event() for _ in range(chunks)]

    def before0(c: int) -> None:
        if c > 0:
            started[c - 1].wait(timeout=2.0)

    def before1(c: int) -> None:
        started[c].set()
        if c + 1 < chunks:
            drew[c + 1].wait(timeout=2.0)

    d0 = FunctionalDropout(before=before0, after=lambda c: drew[c].set())
    d1 = FunctionalDropout(before=before1)
    model = nn.Sequential(d0, Scale(16), d1, Scale(16))
    w0, w1 = model[1].w.detach().clone(), model[3].w.detach().clone()
    gpipe = GPipe(model, [2, 2], devices=["cpu:0", "cpu:1"], chunks=chunks, checkpoint="always")
    _check_masks_consistent(gpipe, w0, w1, repeats=1)


def test_functional_dropout_mask_replayed_on_one_worker() -> None:
    # Partitions sharing the 'cpu' worker run one at a time: replay is exact.
    torch.manual_seed(0)
    model = nn.Sequential(FunctionalDropout(), Scale(16), FunctionalDropout(), Scale(16))
    w0, w1 = model[1].w.detach().clone(), model[3].w.detach().clone()
    gpipe = GPipe(model, [2, 2], devices=["cpu", "cpu"], chunks=4, checkpoint="always")
    _check_masks_consistent(gpipe, w0, w1)


# -- the recompute runs before the gradient arrives ---------------------------


class _Tag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, hook: Callable[[int], None], i: int) -> Tensor:  # type: ignore[override]
        ctx.hook, ctx.i = hook, i
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None, None]:  # type: ignore[override]
        ctx.hook(ctx.i)
        return grad, None, None


class Probe(nn.Module):
    def __init__(self, j: int, on_recompute: Callable[[int], None], on_backward: Callable[[int], None]) -> None:
        super().__init__()
        self.j = j
        self.on_recompute, self.on_backward = on_recompute, on_backward
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        i = int(x[0, 0].item())
        if is_recomputing():
            self.on_recompute(i)
        return _Tag.apply(x * self.w, self.on_backward, i)


def test_recompute_starts_before_gradient_arrives() -> None:
    # Partition 1's backward of micro-batch i blocks until partition 0 has started
    # recomputing micro-batch i (up to a timeout): it only returns early if the
    # recompute of (i, 0) overlaps the backward of (i, 1) that produces its gradient.
    # A correct engine returns at once; the long timeout only bounds a wrong one.
    chunks = 2
    events: List[Tuple[str, int, int]] = []
    lock = threading.Lock()
    recomputed = [threading.Event() for _ in range(chunks)]
    overlapped: List[Tuple[int, bool]] = []

    def log(event: Tuple[str, int, int]) -> None:
        with lock:
            events.append(event)

    def recompute0(i: int) -> None:
        log(("recompute", 0, i))
        recomputed[i].set()

    def backward0(i: int) -> None:
        log(("backward", 0, i))

    def recompute1(i: int) -> None:
        log(("recompute", 1, i))

    def backward1(i: int) -> None:
        log(("backward-start", 1, i))
        overlapped.append((i, recomputed[i].wait(timeout=60.0)))
        log(("backward-end", 1, i))

    model = nn.Sequential(Probe(0, recompute0, backward0), Probe(1, recompute1, backward1))
    gpipe = GPipe(model, [1, 1], devices=["cpu:0", "cpu:1"], chunks=chunks, checkpoint="always")
    x = _indexed_input(chunks)
    gpipe(x).sum().backward()

    assert sorted(overlapped) == [(0, True), (1, True)]
    for i in range(chunks):
        assert events.index(("recompute", 0, i)) < events.index(("backward-end", 1, i))
        assert events.index(("recompute", 1, i)) < events.index(("backward-start", 1, i))
        assert events.index(("backward-end", 1, i)) < events.index(("backward", 0, i))
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("devices", DEVICES)
def test_except_last_counts_chunks_not_micro_batches(devices: List[str]) -> None:
    # As in torchgpipe 0.0.7, the checkpoint stop is computed from `chunks`: with
    # 3 rows in chunks=4 there are 3 micro-batches and 'except_last' (stop 3)
    # checkpoints all of them.
    model, log = _recorded_model(devices, 4, "except_last")
    model(_indexed_input(3)).sum().backward()
    recomputed = sorted({i for _, i, _, recomputing in log if recomputing})
    assert recomputed == [0, 1, 2]


def fail_in_recompute() -> None:
    raise ValueError("recompute failed")


class FailingRecompute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        if is_recomputing():
            fail_in_recompute()
        return x * self.w


@pytest.mark.parametrize("devices", DEVICES)
def test_recompute_error_reaches_backward_caller(devices: List[str]) -> None:
    baseline = threading.active_count()
    model = GPipe(
        nn.Sequential(nn.Identity(), FailingRecompute()),
        _balance(devices, 2),
        devices=devices,
        chunks=2,
        checkpoint="always",
    )
    y = model(_indexed_input(4))
    with pytest.raises(ValueError, match="recompute failed") as excinfo:
        y.sum().backward()
    assert "fail_in_recompute" in [frame.name for frame in traceback.extract_tb(excinfo.tb)]
    assert threading.active_count() == baseline
    assert not is_checkpointing() and not is_recomputing()
