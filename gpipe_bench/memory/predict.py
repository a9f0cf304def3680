"""Predict peak activation memory per device without running the model: meta profiles + the schedule.

Why: the published table's last row needs eight 24 GB cards. A user sizing
such a model, or checking a balance, should get the per-device figure on a
laptop. Two steps, both cheap:

1. **Profile each partition on ``meta``** (shapes only, no memory), once per
   micro-batch size, with the same meter the CPU measurement uses
   (:class:`~gpipe_bench.memory.tracker.TensorMemory`): what a checkpointed
   (no-grad) forward allocates at its peak and leaves behind (the output), what
   a full forward keeps for the backward (saved activations and output), and
   what the backward adds at its peak (gradients of activations, of the input,
   of the parameters).
2. **Replay the engine's schedule** (:mod:`gpipe_bench.pipe.schedule`, the same
   functions the engine runs) on those numbers, clock by clock, with the
   engine's lifetimes: a checkpointed micro-batch keeps only its boundary
   tensors until its backward; one micro-batch at a time is recomputed, one
   clock before its gradient arrives; an input gradient lives until the
   previous partition has used it; the first micro-batch's parameter
   gradients are kept aside until the second is added to them (the sum
   becomes ``.grad``, which is model memory, not activation memory).

**Mixed precision** (``bf16``, ``fp16``: autocast around the forward). Autocast
skips ``meta`` tensors, so those rows are profiled on *fake* CPU tensors
(:class:`~torch._subclasses.fake_tensor.FakeTensorMode`: a device's dispatch,
autocast included, and no memory), with the same meter. Autocast caches the
casts of parameters in one process-wide cache that the outermost autocast
region of *any* thread clears on exit; a grad forward's graph keeps the casts
it used. So the schedule replay also tracks each partition's casts: made by
the first forward (or recompute) after a clear, reused by the next ones, held
while cached or while a graph keeps them. The engine clears at each worker's
exit from a phase (several workers; modelled at the end of the clock of its
last step) and, on one worker (inline on the caller's thread, inside the
caller's autocast), after the loss and after the backward. See
:func:`simulate`.

Cross-device releases inside a clock (partition ``j + 1`` dropping the input
it shares with ``j``) are applied at the end of the clock: concurrent devices
may release in either order, so the prediction takes the later one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call

from gpipe_bench import models, precision
from gpipe_bench.devices import memory_slots
from gpipe_bench.jobs import Job
from gpipe_bench.metakernels import FastMeta
from gpipe_bench.perf import checkpoint_stop, micro_batch_sizes, split
from gpipe_bench.pipe.balance import balance_by_size
from gpipe_bench.pipe.microbatch import Tensors, as_tuple, unpack
from gpipe_bench.pipe.schedule import Step, backward_steps, forward_steps
from gpipe_bench.pipe.skip.tracker import ReplayingTracker, use_skip_tracker

from . import reserved
from .allocator import AllocatorSettings
from .reserved import CellTrace
from .tracker import TensorMemory, storage_key

__all__ = [
    "CellCost",
    "Prediction",
    "profile_partition",
    "profile",
    "simulate",
    "simulate_plain",
    "nbytes",
    "predict_pipeline",
    "predict_plain",
    "layer_held",
    "find_balance",
    "predict_job",
    "head_bytes",
]


@dataclass(frozen=True)
class CellCost:
    """What one micro-batch costs on one partition, in bytes (activations only)."""

    out: int  # the partition's output
    nograd_peak: int  # peak of a no-grad (checkpointed) forward, above what was held before it
    held: int  # left by a full forward: saved activations and the output
    grad_peak: int  # peak of a full forward (or a recompute), above what was held before it
    bwd_peak: int  # peak of the backward above the held activations, parameter gradients included
    bwd_peak_no_param_grads: int  # the same with parameter gradients left out (they become .grad)
    grad_in: int  # the input's gradient, kept until the previous partition has used it
    param_grads: int  # one set of this partition's parameter gradients
    # Under autocast (0 otherwise): the fields above are taken with the partition's parameter casts
    # already cached (not counted); these are the casts and the figures with none cached.
    casts: int = 0  # autocast's cached casts of this partition's parameters
    casts_saved: int = 0  # those of them a grad forward's graph keeps for its backward
    cold_nograd_peak: int = 0  # nograd_peak with no cast cached: the casts it makes included
    cold_grad_peak: int = 0  # grad_peak with no cast cached
    cold_bwd_peak: int = 0  # bwd_peak where only this cell's graph keeps the (saved) casts: freed as it goes
    cold_bwd_peak_no_param_grads: int = 0
    made_bwd_peak: int = 0  # bwd_peak where this cell's own forward made the casts, still cached
    made_bwd_peak_no_param_grads: int = 0
    # The cell's allocation trace for the CUDA allocator model (memory.reserved); fp32 and tf32 profiles only.
    trace: Optional[CellTrace] = field(default=None, compare=False, repr=False)


@dataclass
class Prediction:
    """Peak activation bytes per device, and where in the step each peak falls.

    ``reserved`` / ``allocated``: on CUDA rows predicted with an allocator
    (:mod:`gpipe_bench.memory.reserved`), the caching allocator's peaks per
    device minus the model memory (the published rule), over the row's steps;
    ``allocator`` names the rules. ``None`` where not predicted (a CPU row, autocast).
    """

    per_device: List[int]
    when: List[str] = field(default_factory=list)
    reserved: Optional[List[int]] = None
    allocated: Optional[List[int]] = None
    allocator: str = ""

    @property
    def total(self) -> int:
        return sum(self.per_device)


def nbytes(tensors: Sequence[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: Dict[int, int] = {}
    for t in tensors:
        seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _leaves(inputs: Tensors, requires_grad: bool) -> Tensors:
    return tuple(t.detach().requires_grad_(requires_grad and t.is_floating_point()) for t in inputs)


def profile_partition(
    partition: nn.Module, inputs: Tensors, atomic: bool, *, first: bool
) -> Tuple[CellCost, Tensors, bool]:
    """Profile one cell of ``partition`` on ``inputs`` (meta tensors); also return its output for the next one.

    ``first``: the partition takes the model's input, which needs no gradient.
    """
    params = [p for p in partition.parameters() if p.requires_grad]
    meter = TensorMemory()
    with meter:
        with torch.no_grad():
            out = partition(unpack(_leaves(inputs, False), atomic))
        outputs, out_atomic = as_tuple(out)
        nograd = meter.curves().get(0)
        out_bytes = nbytes(outputs)
        nograd_end, out_ids = meter.mark(), _serials(meter, outputs)
        del out, outputs

        start = meter.mark()
        leaves = _leaves(inputs, not first)
        with torch.enable_grad():
            out = partition(unpack(leaves, atomic))
        outputs, out_atomic = as_tuple(out)
        forward = meter.curves(since=start).get(0)
        held = forward.final if forward else 0
        forward_end = meter.mark()
        kept: List[List[int]] = []
        bwd, bwd_np, grad_in, pgrad_bytes, next_inputs = _backward(meter, outputs, leaves, params, held, kept)
        del out, outputs, leaves
        end = meter.mark()
    trace = _cell_trace(meter, (0, nograd_end, start, forward_end, end), out_ids, kept)

    return (
        CellCost(
            out=out_bytes,
            nograd_peak=nograd.peak if nograd else 0,
            held=held,
            grad_peak=forward.peak if forward else 0,
            bwd_peak=bwd,
            bwd_peak_no_param_grads=bwd_np,
            grad_in=grad_in,
            param_grads=pgrad_bytes,
            trace=trace,
        ),
        next_inputs,
        out_atomic,
    )


def _serials(meter: TensorMemory, tensors: Iterable[Tensor]) -> List[int]:
    """The meter's ids of the allocations behind ``tensors`` (one per storage)."""
    return list(dict.fromkeys(s for s in (meter.serial(t) for t in tensors) if s is not None))


def _cell_trace(
    meter: TensorMemory, marks: Tuple[int, int, int, int, int], out: List[int], kept: List[List[int]]
) -> CellTrace:
    """One cell's :class:`~gpipe_bench.memory.reserved.CellTrace` from the meter's log between ``marks``.

    ``marks``: the no-grad forward's start and end, the grad forward's start and
    end, the end of the backward and of the release of what it used. ``kept``:
    the ids of the input's gradient and of the parameter gradients.
    """
    begin, nograd_end, start, forward_end, end = marks
    grad_in, param_grads = kept if kept else ([], [])
    return CellTrace.of(
        meter.events(begin, nograd_end),
        out,
        meter.events(start, forward_end),
        meter.events(forward_end, end),
        grad_in,
        param_grads,
    )


def profile(
    partitions: Sequence[nn.Module],
    sample: Tensors,
    atomic: bool,
    *,
    precision: str = "fp32",
    backward_autocast: bool = True,
) -> List[CellCost]:
    """:func:`profile_partition` along the pipeline for one micro-batch ``sample`` (on ``meta``).

    ``precision``: under bf16 or fp16 each cell runs under autocast on fake CPU tensors
    (see :func:`profile_partition`); ``backward_autocast``: whether its backward does too
    (the engine's workers: yes; the plain model's backward: no).
    """
    costs: List[CellCost] = []
    dtype = _autocast(precision)
    fake = _Fake() if dtype is not None else None
    inputs, in_atomic = (tuple(fake.like(t) for t in sample) if fake is not None else sample), atomic
    # Each partition runs twice (no-grad, then with grad): a skip crossing a boundary is popped twice.
    # The engine hands it over; its bytes are not charged here.
    with use_skip_tracker(ReplayingTracker()):
        for j, partition in enumerate(partitions):
            if fake is None:
                cost, inputs, in_atomic = profile_partition(partition, inputs, in_atomic, first=j == 0)
            else:
                cost, inputs, in_atomic = _profile_autocast(
                    _FakePartition(partition, fake), inputs, in_atomic, j == 0, precision, backward_autocast
                )
            costs.append(cost)
    return costs


# -- autocast ------------------------------------------------------------------------------------------------------


def _autocast(precision_name: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in under ``precision_name``; None for fp32 and tf32 (no autocast, no change)."""
    return precision.autocast_dtype(precision_name)


class _Fake:
    """Fake CPU stand-ins for ``meta`` tensors, all in one :class:`FakeTensorMode`.

    Why CPU: autocast applies to a tensor by its device, and skips ``meta``. A
    CUDA row is profiled with CPU autocast too, in the row's dtype: for the
    operators of these models the two policies agree (convolutions and linear
    layers in the low dtype; BatchNorm, ReLU, pooling and additions untouched;
    ``cat`` takes the widest input; the loss in fp32), and fake CUDA tensors
    would need CUDA's own autocast, which refuses to start without a GPU.
    """

    def __init__(self) -> None:
        self.mode = FakeTensorMode()
        self._made: Dict[int, Tuple[Tensor, Tensor]] = {}

    def like(self, t: Tensor) -> Tensor:
        """A new fake CPU tensor of ``t``'s shape and dtype."""
        with self.mode:
            return torch.empty(t.shape, dtype=t.dtype, device="cpu")

    def tensor(self, t: Tensor) -> Tensor:
        """The one fake stand-in of parameter or buffer ``t`` (a leaf that requires grad where ``t`` does)."""
        made = self._made.get(id(t))
        if made is None:
            made = (t, self.like(t).requires_grad_(t.requires_grad))
            self._made[id(t)] = made
        return made[1]


class _FakePartition:
    """A partition run on its parameters' fake stand-ins (the ``meta`` module itself is left untouched)."""

    def __init__(self, module: nn.Module, fake: _Fake) -> None:
        self.module, self.fake = module, fake
        named = itertools.chain(
            module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
        )
        self.state = {name: fake.tensor(t) for name, t in named}
        self.params = [fake.tensor(p) for p in module.parameters() if p.requires_grad]

    def __call__(self, inputs: Tensors, atomic: bool) -> Any:
        return self.call(unpack(inputs, atomic))

    def call(self, x: Any) -> Any:
        return functional_call(self.module, self.state, (x,))


def _above(meter: TensorMemory, mark: int, base: int) -> Tuple[int, int]:
    """(peak, final) live bytes of owner 0 since ``mark``, above ``base``."""
    curve = meter.curves(since=mark).get(0)
    return (curve.peak - base, curve.final - base) if curve else (0, 0)


def _base(meter: TensorMemory) -> Tuple[int, int]:
    """A mark now, and the live bytes then (nothing of owner 1 is live at the marks taken here)."""
    mark = meter.mark()
    return mark, meter.live_at([mark])[0]


def _backward(
    meter: TensorMemory,
    outputs: Tensors,
    leaves: Tensors,
    params: Sequence[Tensor],
    base: int,
    kept: Optional[List[List[int]]] = None,
) -> Tuple[int, int, int, int, Tensors]:
    """One cell's backward: (peak, peak without parameter gradients) above ``base`` (never below 0), grad_in,
    param_grads, outputs. ``kept``: appended the meter's ids of the input's gradients, then of the parameters'."""
    with meter.charge(1):  # the gradient arriving from the next partition is not this one's
        grad_outputs = [torch.ones_like(t) if t.requires_grad else None for t in outputs]
    mark = meter.mark()
    pairs = [(t, g) for t, g in zip(outputs, grad_outputs) if g is not None]
    wrt = [t for t in leaves if t.requires_grad] + list(params)
    grads: Sequence[Optional[Tensor]] = ()
    if pairs and wrt:
        grads = torch.autograd.grad([t for t, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    n_in = sum(1 for t in leaves if t.requires_grad)
    grad_in = nbytes([g for g in grads[:n_in] if g is not None])
    param_grads = [g for g in grads[n_in:] if g is not None]
    if kept is not None:
        kept.extend([_serials(meter, [g for g in grads[:n_in] if g is not None]), _serials(meter, param_grads)])
    peak, _ = _above(meter, mark, base)
    meter.exclude(param_grads)
    peak_np, _ = _above(meter, mark, base)
    return max(0, peak), max(0, peak_np), grad_in, nbytes(param_grads), tuple(t.detach() for t in outputs)


def _grad_forward(
    meter: TensorMemory, partition: "_FakePartition", inputs: Tensors, atomic: bool, first: bool
) -> Tuple[int, int, Tensors, Tensors]:
    """A forward with autograd of one cell: (mark before it, live bytes then, its outputs, its input leaves)."""
    mark, base = _base(meter)
    leaves = _leaves(inputs, not first)
    with torch.enable_grad():
        outputs, _ = as_tuple(partition(leaves, atomic))
    return mark, base, outputs, leaves


def _profile_autocast(
    partition: _FakePartition, inputs: Tensors, atomic: bool, first: bool, precision_name: str, backward_autocast: bool
) -> Tuple[CellCost, Tensors, bool]:
    """:func:`profile_partition` under autocast, on fake CPU tensors, with and without its casts cached.

    With the casts cached (a warm cell): a no-grad forward, a grad forward and its
    backward, the casts not counted. With none cached (the first cell after a
    clear): each forward makes the casts (counted), and the backward runs after a
    clear, the graph alone keeping the casts it saved, freed as the backward
    walks it. ``casts`` is what the no-grad forward leaves cached;
    ``casts_saved`` what a grad forward's graph still holds after a clear.
    """
    dtype = _autocast(precision_name)
    meter = TensorMemory()
    params = partition.params

    def backward_context() -> Any:
        return torch.autocast("cpu", dtype=dtype, enabled=backward_autocast)

    with partition.fake.mode, meter:
        torch.clear_autocast_cache()
        with torch.autocast("cpu", dtype=dtype):
            mark, base = _base(meter)
            with torch.no_grad():
                out = partition(_leaves(inputs, False), atomic)
            outputs, out_atomic = as_tuple(out)
            out_bytes = nbytes(outputs)
            cold_nograd_peak, left = _above(meter, mark, base)
            del out, outputs
            casts = left - out_bytes

            mark, base = _base(meter)
            with torch.no_grad():
                out = partition(_leaves(inputs, False), atomic)
            nograd_peak, _ = _above(meter, mark, base)
            del out

            mark, base, outputs, leaves = _grad_forward(meter, partition, inputs, atomic, first)
            grad_peak, held = _above(meter, mark, base)
            with backward_context():
                bwd, bwd_np, grad_in, param_grads, next_inputs = _backward(meter, outputs, leaves, params, base + held)
            del outputs, leaves

        with torch.autocast("cpu", dtype=dtype):
            mark, base, outputs, leaves = _grad_forward(meter, partition, inputs, atomic, first)
            cold_grad_peak, _ = _above(meter, mark, base)
        _, kept = _above(meter, mark, base)  # after the clear: the activations and the casts the graph saved
        casts_saved = kept - held
        with backward_context():
            cold_bwd, cold_bwd_np, _, _, cold_next = _backward(meter, outputs, leaves, params, base + kept)
        del outputs, leaves, cold_next  # nothing of this cell lives on into the next measurement

        # A forward that made the casts, its backward run with them still cached (a recompute after a
        # clear, then its backward in the same region): autograd then holds more of the backward's
        # intermediates than when the casts came from an earlier forward (measured with real CPU
        # tensors: 3.90 MB against 1.76 MB above the held bytes on quick AmoebaNet-D pipeline-1).
        torch.clear_autocast_cache()
        with torch.autocast("cpu", dtype=dtype):
            mark, base, outputs, leaves = _grad_forward(meter, partition, inputs, atomic, first)
            _, made = _above(meter, mark, base)
            with backward_context():
                made_bwd, made_bwd_np, _, _, made_next = _backward(meter, outputs, leaves, params, base + made)
            del outputs, leaves, made_next

    cost = CellCost(
        out=out_bytes,
        nograd_peak=nograd_peak,
        held=held,
        grad_peak=grad_peak,
        bwd_peak=bwd,
        bwd_peak_no_param_grads=bwd_np,
        grad_in=grad_in,
        param_grads=param_grads,
        casts=casts,
        casts_saved=casts_saved,
        cold_nograd_peak=cold_nograd_peak,
        cold_grad_peak=cold_grad_peak,
        cold_bwd_peak=cold_bwd,
        cold_bwd_peak_no_param_grads=cold_bwd_np,
        made_bwd_peak=made_bwd,
        made_bwd_peak_no_param_grads=made_bwd_np,
    )
    return cost, next_inputs, out_atomic


def layer_held(model: nn.Sequential, sample: Tensor, *, precision: str = "fp32") -> Tuple[List[int], List[int]]:
    """Per layer: what it adds to the bytes a forward with autograd keeps, and its output's bytes (one ``meta`` pass).

    The planner weighs every contiguous block of layers; profiling each block
    (:func:`profile`) would take a pass per block. Instead the whole model runs
    once and the meter is read after every layer: the bytes a block
    ``[s, e)`` keeps for its backward are the live bytes after layer ``e - 1``
    less those after layer ``s - 1``, a difference of prefix sums. A layer's
    figure can be negative (it frees an input it did not save).

    ``precision``: under bf16 or fp16 the pass runs under autocast on fake CPU
    tensors, so a layer's figure is in the dtypes autocast gives, its parameters'
    casts (cached for the region) included.
    """
    dtype = _autocast(precision)
    if dtype is None:
        return _layer_held(model.children(), sample)
    fake = _Fake()
    layers = [_FakePartition(layer, fake) for layer in model.children()]
    with fake.mode, torch.autocast("cpu", dtype=dtype):
        return _layer_held([layer.call for layer in layers], fake.like(sample))


def _layer_held(layers: Iterable[Callable[[Any], Any]], sample: Tensor) -> Tuple[List[int], List[int]]:
    meter = TensorMemory()
    marks: List[int] = []
    outs: List[int] = []
    with meter, torch.enable_grad():
        start = meter.mark()
        x: Any = sample
        for layer in layers:
            x = layer(x)
            marks.append(meter.mark())
            outs.append(nbytes(as_tuple(x)[0]))
        live = meter.live_at([start, *marks])
        del x
    return [b - a for a, b in zip(live, live[1:])], outs


class _Slots:
    """Live bytes and peaks per device, addressed by partition, with releases deferred to the end of a clock."""

    def __init__(self, devices: int, slot: Sequence[int]) -> None:
        self.slot = list(slot)
        self.live_ = [0] * devices
        self.peak = [0] * devices
        self.when = [""] * devices
        self.later: List[Tuple[int, int]] = []

    def at(self, j: int, transient: int, what: str) -> None:
        d = self.slot[j]
        if self.live_[d] + transient > self.peak[d]:
            self.peak[d], self.when[d] = self.live_[d] + transient, f"{what} on partition {j}"

    def add(self, j: int, nbytes: int, what: str) -> None:
        self.live_[self.slot[j]] += nbytes
        self.at(j, 0, what)

    def free(self, j: int, nbytes: int) -> None:
        self.live_[self.slot[j]] -= nbytes

    def end_of_clock(self) -> None:
        for j, nbytes in self.later:
            self.free(j, nbytes)
        self.later.clear()


class _Casts:
    """Autocast's cached parameter casts per partition, in generations: what a device holds of them, when.

    A generation is made by the first forward (or recompute) of a partition after
    a clear and is reused by the next ones. It holds ``casts`` bytes while cached,
    and its ``casts_saved`` while a grad forward's graph that used it lives.
    With no casts (fp32) every method leaves the device untouched.
    """

    def __init__(self, dev: _Slots, costs: Sequence[CellCost]) -> None:
        self.dev = dev
        self.size = [c.casts for c in costs]
        self.saved = [c.casts_saved for c in costs]
        self.cached: List[Optional[int]] = [None] * len(costs)
        self.refs: Dict[Tuple[int, int], int] = {}  # (partition, generation) -> graphs keeping it
        self.holder: Dict[Tuple[int, int], int] = {}  # cell (i, j) -> the generation its graph keeps
        self.makers: Set[Tuple[int, int]] = set()  # cells whose grad forward made the generation they keep
        self.serial = 0

    def cold(self, j: int) -> bool:
        """Whether a forward of partition ``j`` now makes its casts (the ``cold_*`` figures apply)."""
        return self.size[j] > 0 and self.cached[j] is None

    def use(self, j: int, what: str) -> None:
        """A forward of ``j`` ran: its casts are cached (made now if they were not)."""
        if self.cold(j):
            self.serial += 1
            self.cached[j] = self.serial
            self.dev.add(j, self.size[j], what)

    def keep(self, i: int, j: int, made: bool = False) -> None:
        """Cell ``(i, j)`` ran a grad forward: its graph keeps the cached generation's saved casts.

        ``made``: that forward made them (none were cached before it).
        """
        g = self.cached[j]
        if g is not None:
            self.holder[(i, j)] = g
            self.refs[(j, g)] = self.refs.get((j, g), 0) + 1
            if made:
                self.makers.add((i, j))

    def made(self, i: int, j: int) -> bool:
        """Whether cell ``(i, j)``'s own grad forward made the casts its graph keeps."""
        return (i, j) in self.makers

    def alone(self, i: int, j: int) -> bool:
        """Whether cell ``(i, j)``'s graph alone keeps its casts (its backward frees them as it goes)."""
        g = self.holder.get((i, j))
        return g is not None and self.cached[j] != g and self.refs[(j, g)] == 1

    def release(self, i: int, j: int) -> None:
        """Cell ``(i, j)``'s backward freed its graph."""
        g = self.holder.pop((i, j), None)
        self.makers.discard((i, j))
        if g is None:
            return
        self.refs[(j, g)] -= 1
        if self.refs[(j, g)] == 0:
            del self.refs[(j, g)]
            if self.cached[j] != g:
                self.dev.free(j, self.saved[j])

    def clear(self) -> None:
        """An outermost autocast region exited (on any thread): the process-wide cache empties."""
        for j, g in enumerate(self.cached):
            if g is not None:
                self.cached[j] = None
                self.dev.free(j, self.size[j] - (self.saved[j] if (j, g) in self.refs else 0))


def _last_clocks(clocks: List[List[Step]], slot: Sequence[int]) -> Dict[int, int]:
    """Per worker (memory slot), the clock of its last step in a phase: it leaves its autocast region after it."""
    last: Dict[int, int] = {}
    for c, steps in enumerate(clocks):
        for step in steps:
            last[slot[step.j]] = c
    return last


def _clears(clocks: List[List[Step]], slot: Sequence[int]) -> List[bool]:
    """Per clock, whether a worker's exit clears autocast's cache at its end.

    One worker runs inline on the caller's thread: it clears once, after the last
    clock (the backward; the forward's region is nested in the caller's, which
    clears after the loss).
    """
    ends = set(_last_clocks(clocks, slot).values())
    if len(set(slot)) == 1:
        ends = {len(clocks) - 1}
    return [c in ends for c in range(len(clocks))]


def simulate(
    costs: Sequence[Sequence[CellCost]],
    checkpoint_stop: int,
    *,
    input_bytes: int = 0,
    head_bytes: int = 0,
    optimizer_temp: Optional[Sequence[int]] = None,
    slots: Optional[Sequence[int]] = None,
) -> Prediction:
    """Replay the fill-drain schedule over ``costs[i][j]`` (micro-batch ``i``, partition ``j``).

    ``input_bytes`` (the mini-batch) is held on the first device throughout;
    ``head_bytes`` (the joined output and its gradient, the labels) on the
    last; ``optimizer_temp[j]`` is the optimizer step's scratch of partition
    ``j``. ``slots[j]`` is the device partition ``j`` runs on, when partitions
    share devices (default: one device each); the result has one entry per device.
    Partitions on one device share one worker, as in the engine.

    Under autocast (costs with ``casts``), each partition's parameter casts are
    tracked too (:class:`_Casts`): a forward or recompute with none cached takes
    the ``cold_*`` figures and makes them; a backward whose graph alone keeps its
    casts takes the ``cold_bwd_*`` ones. Caches clear where the engine's
    autocast regions end (:func:`_clears`) and after the loss.
    """
    m, n = len(costs), len(costs[0])
    slot = list(slots) if slots is not None else list(range(n))
    dev = _Slots(max(slot) + 1, slot)
    casts = _Casts(dev, costs[0])
    dev.add(0, input_bytes, "input")
    forward = forward_steps(m, n)
    clears = _clears(forward, slot) if len(set(slot)) > 1 else [False] * len(forward)
    for clock, steps in zip(clears, forward):
        for step in steps:
            i, j = step.i, step.j
            c = costs[i][j]
            cold = casts.cold(j)
            if i < checkpoint_stop:
                dev.at(j, c.cold_nograd_peak if cold else c.nograd_peak, f"forward {i} (checkpointed)")
                casts.use(j, f"forward {i} (checkpointed)")
                dev.add(j, c.out, f"forward {i} (checkpointed)")
            else:
                dev.at(j, c.cold_grad_peak if cold else c.grad_peak, f"forward {i}")
                casts.use(j, f"forward {i}")
                casts.keep(i, j, made=cold)
                dev.add(j, c.held, f"forward {i}")
        if clock:
            casts.clear()
    dev.add(n - 1, head_bytes, "loss")
    casts.clear()  # the caller's autocast region ends after the loss

    done = [0] * n
    backward = backward_steps(m, n, lambda i: i < checkpoint_stop)
    for clock, steps in zip(_clears(backward, slot), backward):
        for step in steps:
            i, j = step.i, step.j
            c = costs[i][j]
            if step.kind == "recompute":
                cold = casts.cold(j)
                dev.at(j, c.cold_grad_peak if cold else c.grad_peak, f"recompute {i}")
                casts.use(j, f"recompute {i}")
                casts.keep(i, j, made=cold)
                dev.add(j, c.held, f"recompute {i}")
                if j == n - 1:
                    dev.free(j, c.out)  # the recomputed output replaces the checkpointed one
                continue
            if casts.alone(i, j):
                bwd = c.cold_bwd_peak if m > 1 else c.cold_bwd_peak_no_param_grads
            elif casts.made(i, j):
                bwd = c.made_bwd_peak if m > 1 else c.made_bwd_peak_no_param_grads
            else:
                bwd = c.bwd_peak if m > 1 else c.bwd_peak_no_param_grads
            dev.at(j, bwd, f"backward {i}")
            dev.free(j, c.held)
            casts.release(i, j)
            if j > 0:
                dev.free(j, -c.grad_in)
            if m > 1 and done[j] == 0:
                dev.free(j, -c.param_grads)  # the first gradients, until the second is added
            elif m > 1 and done[j] == 1:
                dev.free(j, costs[m - 1][j].param_grads)
            done[j] += 1
            if j < n - 1:
                dev.later.append((j + 1, costs[i][j + 1].grad_in))
            if j > 0 and i < checkpoint_stop:
                dev.later.append((j - 1, costs[i][j - 1].out))  # the checkpointed output it took as input
        dev.end_of_clock()
        if clock:
            casts.clear()
    for j in range(n):
        dev.at(j, (optimizer_temp or [0] * n)[j], "optimizer step")
    return Prediction(per_device=dev.peak, when=dev.when)


def simulate_plain(cost: CellCost, *, input_bytes: int = 0, head_bytes: int = 0, optimizer_temp: int = 0) -> Prediction:
    """The plain model on one device: one full forward, the backward, the optimizer step.

    Under autocast (``cost.casts``) the forward makes the casts, the loss runs with
    them cached, the cache clears as the forward's autocast region ends, and the
    backward (outside autocast) frees the casts its graph saved as it walks it.
    """
    dev = _Slots(1, [0])
    dev.add(0, input_bytes, "input")
    if not cost.casts:
        dev.at(0, cost.grad_peak, "forward")
        dev.add(0, cost.held + head_bytes, "forward")
        dev.at(0, cost.bwd_peak_no_param_grads, "backward")
        dev.free(0, cost.held)
    else:
        dev.at(0, cost.cold_grad_peak, "forward")
        dev.add(0, cost.held + cost.casts + head_bytes, "forward")
        dev.free(0, cost.casts - cost.casts_saved)
        dev.at(0, cost.cold_bwd_peak_no_param_grads, "backward")
        dev.free(0, cost.held + cost.casts_saved)
    dev.at(0, optimizer_temp, "optimizer step")
    return Prediction(per_device=dev.peak, when=dev.when)


def _profile_key(balance: Sequence[int], size: int, precision_name: str) -> Tuple[Any, ...]:
    """A partition profile's key in a caller's cache: fp32 keeps the key it always had."""
    if _autocast(precision_name) is None:
        return (tuple(balance), size)
    return (tuple(balance), size, precision_name)


def predict_pipeline(
    model: nn.Sequential,
    balance: Sequence[int],
    sample: Tensor,
    *,
    chunks: int,
    checkpoint: str,
    slots: Optional[Sequence[int]] = None,
    head_bytes: int = 0,
    optimizer_temp: Optional[Sequence[int]] = None,
    cache: Optional[Dict[Any, List[CellCost]]] = None,
    precision: str = "fp32",
    allocator: Optional[reserved.Setup] = None,
) -> Prediction:
    """Peak activation bytes per device of a GPipe training step of ``model`` (on ``meta``) on ``sample``.

    ``sample`` is the whole mini-batch (a ``meta`` tensor); it counts on the first device.
    ``cache``: profiles by (balance, micro-batch size), kept by a caller that predicts many
    configurations of one model (the planner: checkpoint modes share them).
    ``precision``: the row's; under bf16 or fp16 the step runs under autocast (see :func:`simulate`).
    """
    parts = split(model, balance)
    sizes = micro_batch_sizes(sample.size(0), chunks)
    cache = cache if cache is not None else {}
    for size in set(sizes):
        key = _profile_key(balance, size, precision)
        if key not in cache:
            cache[key] = profile(parts, (sample[:size],), True, precision=precision)
    by_size = {size: cache[_profile_key(balance, size, precision)] for size in set(sizes)}
    costs = [by_size[size] for size in sizes]
    stop, input_bytes = checkpoint_stop(checkpoint, chunks), nbytes([sample])
    prediction = simulate(
        costs, stop, input_bytes=input_bytes, head_bytes=head_bytes, optimizer_temp=optimizer_temp, slots=slots
    )
    if allocator is not None:
        _with_reserved(prediction, allocator, costs, stop, parts, slots, input_bytes, head_bytes)
    return prediction


def _with_reserved(
    prediction: Prediction,
    setup: reserved.Setup,
    costs: Sequence[Sequence[CellCost]],
    stop: int,
    parts: Sequence[nn.Module],
    slots: Optional[Sequence[int]],
    input_bytes: int,
    head_bytes: int,
) -> None:
    """Add the CUDA allocator's figures to ``prediction`` (nothing when a cell has no trace: autocast)."""
    traces = [[c.trace for c in row] for row in costs]
    if any(t is None for row in traces for t in row):
        return
    params = [[p.numel() * p.element_size() for p in part.parameters()] for part in parts]
    result = reserved.replay_steps(
        cast(List[List[CellTrace]], traces),
        stop,
        reserved.ModelState(params),
        setup,
        slots=slots,
        input_bytes=input_bytes,
        head_bytes=head_bytes,
    )
    prediction.reserved = [max(0, p - m) for p, m in zip(result.peak_reserved, result.model_bytes)]
    prediction.allocated = [max(0, p - m) for p, m in zip(result.peak_allocated, result.model_bytes)]
    prediction.allocator = setup.describe()


def predict_plain(
    model: nn.Module,
    sample: Tensor,
    *,
    head_bytes: int = 0,
    optimizer_temp: int = 0,
    precision: str = "fp32",
    allocator: Optional[reserved.Setup] = None,
) -> Prediction:
    """Peak activation bytes of a training step of the plain ``model`` (on ``meta``) on ``sample``.

    ``precision``: under bf16 or fp16 the forward runs under autocast, the backward outside it.
    """
    cost = profile([model], (sample,), True, precision=precision, backward_autocast=False)[0]
    input_bytes = nbytes([sample])
    prediction = simulate_plain(cost, input_bytes=input_bytes, head_bytes=head_bytes, optimizer_temp=optimizer_temp)
    if allocator is not None:
        _with_reserved(prediction, allocator, [[cost]], 0, [model], None, input_bytes, head_bytes)
    return prediction


def head_bytes(outputs: Sequence[Tensor], batch: int, precision: str = "fp32") -> int:
    """What the loss holds beside the model, from the model's ``outputs`` for one sample (fp32, on ``meta``).

    fp32: the joined output, its gradient, the labels. Under autocast the joined
    output is in the low dtype and cross-entropy runs in fp32 on an upcast copy:
    the figure is the meter's peak over the loss's forward and backward on fake
    tensors (the output, its upcast, log-softmax, the gradients, the labels).
    """
    dtype = _autocast(precision)
    if dtype is None:
        return 2 * nbytes(outputs) * batch + batch * 8
    fake = _Fake()
    meter = TensorMemory()
    with fake.mode, meter:
        joined = torch.empty((batch, *outputs[0].shape[1:]), dtype=dtype).requires_grad_()
        labels = torch.zeros(batch, dtype=torch.long)
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(joined, labels)
        (grad,) = torch.autograd.grad(loss, joined)
        del joined, labels, loss, grad
    curve = meter.curves().get(0)
    return curve.peak if curve else 0


# -- a resolved row ------------------------------------------------------------------------------------------------


def _meta_model(job: Job) -> nn.Sequential:
    return models.build_meta(job.model_name, **job.model_args)


def find_balance(job: Job, model: Optional[nn.Sequential] = None) -> Tuple[int, ...]:
    """The row's balance, or one found by ``balance_by_size`` on ``meta`` when the config leaves it null.

    ``model``: the row's model on ``meta``, when the caller has built it already.
    """
    if job.row.balance is not None:
        return tuple(job.row.balance)
    model = model if model is not None else _meta_model(job)
    if not job.split or job.row.devices == 1:
        return (len(model),)
    s = job.settings
    sample = torch.empty(job.row.batch, 3, s.input_size, s.input_size, device="meta")
    copies = job.memory_settings.parameter_copies
    return tuple(
        balance_by_size(job.row.devices, model, sample, chunks=job.row.chunks, param_scale=copies, device="meta")
    )


def _optimizer_temp(part: nn.Module, device: str) -> int:
    """Scratch of an RMSprop step: one buffer per parameter tensor, all at once where PyTorch uses foreach (CUDA)."""
    sizes = [p.numel() * p.element_size() for p in part.parameters()]
    if not sizes:
        return 0
    return sum(sizes) if device.startswith("cuda") else max(sizes)


def predict_job(
    job: Job,
    balance: Sequence[int],
    model: Optional[nn.Sequential] = None,
    cache: Optional[Dict[Any, Any]] = None,
    allocator: Optional[AllocatorSettings] = None,
) -> Prediction:
    """Peak activation bytes per device for the row, from ``meta`` (see :mod:`gpipe_bench.memory.predict`).

    Under the row's precision: bf16 and fp16 run the forward under autocast.
    ``cache``: partition profiles kept across calls (:func:`~gpipe_bench.memory.predict.predict_pipeline`).
    ``allocator``: on a CUDA row, also predict what the caching allocator reserves under these
    settings (:mod:`gpipe_bench.memory.reserved`), over the table's training steps.
    """
    row, s = job.row, job.settings
    model = model if model is not None else _meta_model(job)
    model.train()
    sample = torch.empty(row.batch, 3, s.input_size, s.input_size, device="meta")
    with torch.device("meta"), FastMeta():
        out = model(sample[:1])
    chosen = getattr(row, "precision", "fp32")
    head = head_bytes(as_tuple(out)[0], row.batch, chosen)
    setup = _setup(job, allocator)
    if not job.split:
        temp = _optimizer_temp(model, job.devices[0])
        return predict_plain(model, sample, head_bytes=head, optimizer_temp=temp, precision=chosen, allocator=setup)
    parts = split(model, balance)
    devices = list(job.devices)
    _, slots = memory_slots(devices)
    temps = [_optimizer_temp(p, d) for p, d in zip(parts, devices)]
    return predict_pipeline(
        model,
        balance,
        sample,
        chunks=row.chunks,
        checkpoint=row.checkpoint,
        slots=slots,
        head_bytes=head,
        optimizer_temp=temps,
        cache=cache,
        precision=chosen,
        allocator=setup,
    )


def _setup(job: Job, allocator: Optional[AllocatorSettings]) -> Optional[reserved.Setup]:
    """The allocator replay of a CUDA row (None on a CPU row or without settings)."""
    if allocator is None or not any(d.startswith("cuda") for d in job.devices):
        return None
    try:
        steps = job.memory_settings.steps
    except TypeError:  # not a memory table: the memory table's default
        steps = reserved.STEPS
    return reserved.Setup(allocator, steps=steps)
