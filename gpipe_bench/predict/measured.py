"""Time every layer of a model on the device at hand: forward and backward apart, per micro-batch size.

Why separately from the balance profiler (:mod:`gpipe_bench.pipe.balance.profile`):
balancing needs one number per layer, a prediction needs the forward and the
backward apart (a recompute repeats only the forward; the schedules place
them at different clocks) and at the thread count each worker will really
have. Two virtual CPU devices on a two-core host run one thread each; the
plain model runs on both. A layer timed with the wrong count is off by up to
the number of cores.

The model is built fresh for the measurement (never the user's), run layer
by layer on the output of the one before, each layer's backward alone with
respect to its own input and parameters. One round warms up and is thrown
away; each layer's figure is the median of the rounds after it, so one
interrupted round (a collection, another process) does not move it. A
backward timed alone pays a ``torch.autograd.grad`` call of its own, which a
real step pays once per cell: the cost of an empty call is taken off each.
A checkpointed micro-batch's first forward runs without autograd, so the
no-grad forward is timed too. Under a row's bf16 or fp16 every forward runs
under autocast (:func:`gpipe_bench.precision.forward_pass`), its backward
outside it, as the engine runs a cell.
"""

from __future__ import annotations

import gc
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from statistics import median
from typing import Iterator, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from gpipe_bench.pipe.microbatch import as_tuple
from gpipe_bench.pipe.skip.tracker import ReplayingTracker, use_skip_tracker
from gpipe_bench.precision import DEFAULT, forward_pass

__all__ = ["LayerTimes", "time_layers", "intra_op_threads", "contention", "synchronize"]


@dataclass(frozen=True)
class LayerTimes:
    """Seconds per layer: ``forward[k]`` and ``backward[k]`` of layer ``k`` at one micro-batch size.

    ``forward_fixed`` / ``backward_fixed``: the part of each that does not grow
    with the batch (the intercept of the line through this size and a batch of
    :data:`SMALL`): the host's work per call, which is what concurrent workers
    of one interpreter contend for. Empty when the batch is too small to tell.
    """

    batch: int
    threads: int
    forward: List[float]
    backward: List[float]
    forward_fixed: List[float] = field(default_factory=list)
    backward_fixed: List[float] = field(default_factory=list)
    #: no-grad forward / forward, per layer: what a checkpointed micro-batch's first forward costs
    nograd: List[float] = field(default_factory=list)

    def scaled(self, batch: int) -> "LayerTimes":
        """The same layers at a smaller ``batch``: the fixed part kept, the rest in proportion."""
        fixed_f = self.forward_fixed or [0.0] * len(self.forward)
        fixed_b = self.backward_fixed or [0.0] * len(self.backward)
        share = batch / self.batch
        return LayerTimes(
            batch,
            self.threads,
            [h + (t - h) * share for t, h in zip(self.forward, fixed_f)],
            [h + (t - h) * share for t, h in zip(self.backward, fixed_b)],
            self.forward_fixed,
            self.backward_fixed,
            self.nograd,
        )


#: The small batch the fixed part is found from (2, not 1: BatchNorm in training needs two values per channel).
SMALL = 2


def synchronize(device: torch.device) -> None:
    """Wait for ``device`` to finish what is queued (nothing to wait for on the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` intra-op threads on this thread, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _round(
    layers: Sequence[nn.Module], sample: Tensor, device: torch.device, precision: str = DEFAULT
) -> Iterator[Tuple[float, float, float]]:
    """Each layer's (forward, backward, no-grad forward) seconds, the layers fed one after the other.

    The forwards run under ``precision``'s autocast, the backward outside it.
    """
    batch, atomic = as_tuple(sample)
    for layer in layers:
        leaves = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in batch)
        fed = tuple(t.clone() if t.requires_grad else t for t in leaves)
        synchronize(device)
        tick = time.perf_counter()
        with torch.no_grad(), forward_pass(precision, device.type):
            layer(fed[0] if atomic else fed)
        synchronize(device)
        nograd = time.perf_counter() - tick
        synchronize(device)
        tick = time.perf_counter()
        with forward_pass(precision, device.type):
            out, atomic = as_tuple(layer(fed[0] if atomic else fed))
        synchronize(device)
        forward = time.perf_counter() - tick
        roots = [t for t in out if t.requires_grad]
        wanted = [t for t in leaves if t.requires_grad] + [p for p in layer.parameters() if p.requires_grad]
        tick = time.perf_counter()
        if roots and wanted:
            torch.autograd.grad(roots, wanted, [torch.ones_like(t) for t in roots], allow_unused=True)
        synchronize(device)
        backward = time.perf_counter() - tick
        batch = tuple(t.detach() for t in out)
        del leaves, fed, out, roots, wanted
        yield forward, backward, nograd


def _medians(
    layers: Sequence[nn.Module], sample: Tensor, device: torch.device, rounds: int, precision: str = DEFAULT
) -> Tuple[List[float], List[float], List[float]]:
    fwd: List[List[float]] = [[] for _ in layers]
    bwd: List[List[float]] = [[] for _ in layers]
    nog: List[List[float]] = [[] for _ in layers]
    for r in range(rounds + 1):
        for k, (f, b, n) in enumerate(_round(layers, sample, device, precision)):
            if r > 0:  # the first round pays one-off costs (allocator growth, kernel choice)
                fwd[k].append(f)
                bwd[k].append(b)
                nog[k].append(n)
        gc.collect()
    return [median(t) for t in fwd], [median(t) for t in bwd], [median(t) for t in nog]


def _fixed(big: List[float], small: List[float], b: int) -> List[float]:
    """Intercepts of the lines through (SMALL, small) and (b, big), kept within [0, min(small, big)].

    The fixed part of a time cannot exceed the time itself, whatever the noise between the two sizes.
    """
    out = []
    for t_big, t_small in zip(big, small):
        per_sample = (t_big - t_small) / (b - SMALL)
        out.append(min(t_small, t_big, max(0.0, t_small - per_sample * SMALL)))
    return out


def _grad_call(device: torch.device, samples: int = 200) -> float:
    """Seconds one ``torch.autograd.grad`` call costs around almost no work (the median of ``samples``).

    Each layer's backward is timed by a call of its own, where a real step makes
    one call per cell: without this correction a model of many small layers
    (AmoebaNet-D at F=32: 325 calls) would be charged a call's set-up per layer.
    """
    x = torch.ones(1, device=device)
    times = []
    for k in range(samples + 20):
        leaf = x.detach().requires_grad_(True)
        y = leaf * 1.0
        synchronize(device)
        tick = time.perf_counter()
        torch.autograd.grad([y], [leaf], [torch.ones_like(y)])
        synchronize(device)
        if k >= 20:
            times.append(time.perf_counter() - tick)
    return median(times)


def time_layers(
    model: nn.Sequential,
    sample: Tensor,
    device: torch.device,
    thread_count: int,
    rounds: int = 3,
    fixed: bool = True,
    precision: str = DEFAULT,
) -> LayerTimes:
    """Forward and backward seconds of each layer of ``model`` on ``sample`` (one micro-batch), medians of ``rounds``.

    ``fixed``: also time a batch of :data:`SMALL` to split each time into its fixed part
    and the rest (what scaling to other sizes and the host's share need); a caller that
    uses this one size alone (a planned balance) saves that pass. ``precision``: the
    row's; its forwards are timed under autocast on ``device``.

    ``model`` is moved to ``device`` and trained on (BatchNorm statistics move):
    pass a model built for the measurement. The random streams are restored.
    """
    model = model.to(device).train()
    layers = list(model.children())
    sample = sample.to(device)
    batch = int(sample.size(0))
    devices = [device.index or 0] if device.type == "cuda" else []
    was_enabled = gc.isenabled()
    replaying = use_skip_tracker(ReplayingTracker())  # each layer runs twice: a pop must find its skip again
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), intra_op_threads(thread_count), replaying:
        gc.disable()
        try:
            fwd, bwd, nog = _medians(layers, sample, device, rounds, precision)
            call = _grad_call(device)
            bwd = [max(0.0, b - call) for b in bwd]
            fixed_f: List[float] = []
            fixed_b: List[float] = []
            if fixed and batch > SMALL + 1:
                small_f, small_b, _ = _medians(layers, sample[:SMALL], device, rounds, precision)
                small_b = [max(0.0, b - call) for b in small_b]
                fixed_f, fixed_b = _fixed(fwd, small_f, batch), _fixed(bwd, small_b, batch)
        finally:
            if was_enabled:
                gc.enable()
    ratio = [min(1.0, n / f) if f > 0 else 1.0 for n, f in zip(nog, fwd)]
    return LayerTimes(batch, thread_count, fwd, bwd, fixed_f, fixed_b, ratio)


def contention(
    model: nn.Sequential,
    sample: Tensor,
    thread_count: int,
    workers: int = 2,
    rounds: int = 2,
    precision: str = DEFAULT,
) -> float:
    """How much slower each of ``workers`` threads runs the model's layers while the others run them too.

    Each thread runs every layer's forward and backward, ``rounds`` times after
    a warm-up, with ``thread_count`` intra-op threads (a CPU worker's share), first
    alone and then all at once. Returns ``together / alone - 1`` (at least 0): the
    cost of sharing one host's caches, memory bandwidth and interpreter that
    per-layer timings taken alone cannot see. CPU only.
    """
    model = model.train()
    layers = list(model.children())
    device = torch.device("cpu")

    def work(out: List[float]) -> None:
        with torch.enable_grad(), intra_op_threads(thread_count), use_skip_tracker(ReplayingTracker()):
            for _ in _round(layers, sample, device, precision):
                pass  # warm-up
            tick = time.perf_counter()
            for _ in range(rounds):
                for _ in _round(layers, sample, device, precision):
                    pass
            out.append(time.perf_counter() - tick)

    with torch.random.fork_rng(devices=[]):
        alone: List[float] = []  # each thread keeps its own skip tracker (thread-local): set in work()
        thread = threading.Thread(target=work, args=(alone,))
        thread.start()
        thread.join()
        together: List[float] = []
        pool = [threading.Thread(target=work, args=(together,)) for _ in range(workers)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    return max(0.0, sum(together) / len(together) / alone[0] - 1.0)
