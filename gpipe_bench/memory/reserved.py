"""What the CUDA caching allocator reserves for a row: the predictor's cells as one allocation trace per device.

Why: whether a row fits on a GPU is decided by what the caching allocator
*reserves* (``torch.cuda.max_memory_reserved``), and the published memory
table reports that figure minus the model. :mod:`gpipe_bench.memory.predict`
sums the bytes tensors hold; the allocator rounds every request, carves
segments of 2 or 20 MiB or more, and caches freed blocks that a differently
sized request may not fit. This module builds the allocation trace of whole
training steps from the predictor's per-cell traces, in the engine's order,
and replays it through :mod:`gpipe_bench.memory.allocator`.

The trace, per device (one :class:`~gpipe_bench.memory.allocator.Allocator`
each, as the C++ keeps one per device):

* the model first: every parameter, in the partitions' order;
* the mini-batch on the first device, kept through the steps;
* per step, the cells in the schedule's order (the same functions
  :func:`~gpipe_bench.memory.predict.simulate` walks, with its lifetimes):
  each cell's own allocations and releases as the meter logged them on
  ``meta`` (:class:`CellTrace`): a checkpointed forward leaves its output, a
  forward with autograd (or a recompute) leaves what its backward needs, the
  backward releases that and leaves the input's gradient and one set of
  parameter gradients;
* between devices (CUDA rows), the copies the engine makes: a cell's input
  arrives on its device's incoming copy stream (a pool of its own: blocks
  belong to the stream that allocated them) and is kept until the cell's
  backward, which keeps the input leaf for its gradient; the gradient arriving
  from the next device the same way, for its backward;
* gradient accumulation as the engine does it (:func:`gpipe_bench.pipe.pipeline`'s
  ``_accumulate``): the first micro-batch's gradients kept, the second summed
  out of place into new tensors (which become ``.grad``), later ones added in
  place; ``.grad`` lives until the next step's ``zero_grad`` frees it
  (``set_to_none``, PyTorch's default since 2.0);
* the optimizer step: RMSprop's ``square_avg`` per parameter at the first
  step (kept), and its temporaries: one per parameter, all at once where
  PyTorch uses the multi-tensor (``foreach``) implementation, one at a time
  otherwise;
* cuBLAS's workspace, once per stream that runs a matrix product (PyTorch
  allocates it through the caching allocator).

Era ``"1.3"`` (the published table's PyTorch, torchgpipe 0.0.x): the same
allocator rules (:mod:`gpipe_bench.memory.allocator` says why), but
autograd's own accumulation (the first micro-batch's gradients become
``.grad``, later ones are added in place), ``zero_grad`` zeroing in place
(``.grad`` is kept across steps), RMSprop one parameter at a time, and cuBLAS
managing its own workspace outside the allocator.

Left out, each for a reason: cuDNN's convolution workspaces (their size is
that of the algorithm cuDNN picks at run time, which no documentation gives
ahead of it); ``recordStream``'s deferred reuse (a block freed while a copy is
in flight waits for it: modelled as reusable at once); the CUDA context and
the library handles (outside the allocator: ``plan`` adds the context);
autocast rows (their cells are profiled on fake tensors without a trace).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from gpipe_bench.errors import HarnessError
from gpipe_bench.pipe.schedule import Step, backward_steps, forward_steps

from .allocator import ERA_1_3, Allocator, AllocatorSettings, AllocatorStats

__all__ = [
    "CUBLAS_WORKSPACE",
    "CellTrace",
    "Events",
    "ModelState",
    "Reserved",
    "STEPS",
    "Setup",
    "replay_steps",
    "settings_for",
    "allocator_for",
    "ALLOC_CONF",
]

#: One cell phase's allocations and releases, in order: ``(id, bytes)``; bytes ``-1`` is the release of ``id``.
Events = Tuple[Tuple[int, int], ...]

_MIB = 1 << 20
#: cuBLAS's workspace per (handle, stream), as PyTorch sizes it and takes it from the caching allocator
#: (aten/src/ATen/cuda/CublasHandlePool.cpp, ``parseChosenWorkspaceSize``: ``CUBLAS_WORKSPACE_CONFIG``'s
#: default ":4096:2:16:8", 32 MiB on compute capability 9 and later). Handles are per thread: one for
#: the worker's forward, one for autograd's device thread in the backward.
CUBLAS_WORKSPACE = {"pre-hopper": 4096 * 1024 * 2 + 16 * 1024 * 8, "hopper": 32 * _MIB}
_CUBLAS_HANDLES = ("forward", "backward")

_COMPUTE = 0  # the worker's stream (the allocator's default, which cell phases use)
_INCOMING = "incoming"  # the device's incoming copy stream (gpipe_bench.pipe.copy.CopyStreams)


@dataclass(frozen=True)
class CellTrace:
    """One cell's allocation trace, from the meter's log on ``meta`` (ids are the meter's serials).

    ``nograd``: a checkpointed (no-grad) forward; it leaves ``out`` allocated.
    ``forward``: a forward with autograd, or a recompute; it leaves what the backward needs.
    ``backward``: the backward, then the release of everything ``forward`` left,
    except ``grad_in`` (the input's gradient) and ``param_grads`` (one set of
    parameter gradients), whose lifetimes the schedule decides.
    ``sizes``: the bytes of each id in ``out``, ``grad_in`` and ``param_grads``.
    """

    nograd: Events
    out: Tuple[int, ...]
    forward: Events
    backward: Events
    grad_in: Tuple[int, ...]
    param_grads: Tuple[int, ...]
    sizes: Dict[int, int]

    @classmethod
    def of(
        cls,
        nograd: Sequence[Tuple[int, int]],
        out: Sequence[int],
        forward: Sequence[Tuple[int, int]],
        backward: Sequence[Tuple[int, int]],
        grad_in: Sequence[int],
        param_grads: Sequence[int],
    ) -> CellTrace:
        """A cell's trace from the meter's events of its three phases, kept to what the engine's cell does.

        Left out: zero-byte allocations, and the releases of ``out``, ``grad_in``
        and ``param_grads`` (their lifetimes are the schedule's). The releases
        the profile defers are moved to where the engine makes them: what a
        skip connection's stash keeps (the profile's replaying tracker holds it
        from one forward to the other) is released at the end of the no-grad
        forward that made it, or of the backward of the forward that did; a
        release of something the cell did not make (the stash handed back) is dropped.
        """
        lasting = set(out) | set(grad_in) | set(param_grads)
        made_nograd = [i for i, n in nograd if n > 0]
        made_cell = [i for i, n in itertools.chain(forward, backward) if n > 0]
        freed_nograd = {i for i, n in nograd if n < 0}
        freed_cell = {i for i, n in itertools.chain(forward, backward) if n < 0}
        sizes = {i: n for i, n in itertools.chain(nograd, forward, backward) if n > 0}

        def phase(events: Sequence[Tuple[int, int]], ours: Set[int]) -> List[Tuple[int, int]]:
            return [(i, n) for i, n in events if i in ours and (n > 0 or i not in lasting)]

        late_nograd = [(i, -1) for i in made_nograd if i not in freed_nograd and i not in lasting]
        late_cell = [(i, -1) for i in made_cell if i not in freed_cell and i not in lasting]
        kept = [i for i in out if i in sizes]
        return cls(
            nograd=tuple(phase(nograd, set(made_nograd)) + late_nograd),
            out=tuple(kept),
            forward=tuple(phase(forward, set(made_cell))),
            backward=tuple(phase(backward, set(made_cell)) + late_cell),
            grad_in=tuple(i for i in grad_in if i in sizes),
            param_grads=tuple(i for i in param_grads if i in sizes),
            sizes={i: sizes[i] for i in itertools.chain(kept, grad_in, param_grads) if i in sizes},
        )


@dataclass(frozen=True)
class ModelState:
    """The parameters' sizes in bytes, per partition, and the optimizer's buffers per parameter (RMSprop: one)."""

    params: Sequence[Sequence[int]]
    state_buffers: int = 1


#: Training steps replayed when the row does not say (the memory table's default).
STEPS = 2


@dataclass(frozen=True)
class Setup:
    """How a row's steps are replayed: the allocator's settings (and era), the steps, the GPU's cuBLAS workspace.

    ``foreach``: the optimizer's multi-tensor step (PyTorch's default on CUDA today;
    era 1.3 had none). ``hopper``: a compute capability 9 GPU or later (32 MiB cuBLAS workspace).
    """

    settings: AllocatorSettings
    steps: int = STEPS
    foreach: bool = True
    hopper: bool = False

    @property
    def legacy(self) -> bool:
        return self.settings.era == ERA_1_3

    @property
    def workspace(self) -> int:
        """cuBLAS's workspace in the allocator: none in 1.3 (cuBLAS allocated its own)."""
        if self.legacy:
            return 0
        return CUBLAS_WORKSPACE["hopper" if self.hopper else "pre-hopper"]

    def describe(self) -> str:
        """The rules the figures follow, for a record and a table's footnote."""
        if self.legacy:
            return (
                "CUDA caching allocator of PyTorch 1.3 (2019) with that era's training step: autograd's gradient "
                "accumulation, zero_grad in place, the optimizer one parameter at a time"
            )
        return (
            "today's CUDA caching allocator (PyTorch's c10/cuda/CUDACachingAllocator.cpp at 001074d25084)"
            + (f"; PYTORCH_CUDA_ALLOC_CONF={self.settings.conf}" if self.settings.conf else "")
            + "; our engine's training step"
            + (", the optimizer's multi-tensor (foreach) step" if self.foreach else "")
        )


@dataclass(frozen=True)
class Reserved:
    """Per device: the allocator's statistics over the steps (peaks include the model state)."""

    stats: List[AllocatorStats]
    model_bytes: List[int]  # per device: the parameters, gradients and optimizer buffers the trace allocated

    @property
    def peak_reserved(self) -> List[int]:
        return [s.peak_reserved for s in self.stats]

    @property
    def peak_allocated(self) -> List[int]:
        return [s.peak_allocated for s in self.stats]


def _run(allocator: Allocator, events: Events, base: int) -> None:
    malloc, free = allocator.malloc, allocator.free
    for key, nbytes in events:
        if nbytes < 0:
            free(base + key)
        else:
            malloc(base + key, nbytes)


def _cached(function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Memoise a function of one trace object by identity (the object is kept with its result, so its id
    stays its own); the memo is emptied past 4096 objects, so a long search does not hold every trace."""
    memo: Dict[int, Tuple[Any, Any]] = {}

    def wrapped(arg: Any) -> Any:
        hit = memo.get(id(arg))
        if hit is None or hit[0] is not arg:
            if len(memo) >= 4096:
                memo.clear()
            hit = memo[id(arg)] = (arg, function(arg))
        return hit[1]

    return wrapped


@_cached
def _net(events: Events) -> Events:
    """What outlives a phase, in order: releases of what it did not allocate, allocations it does not release."""
    made = {i for i, n in events if n >= 0}
    gone = {i for i, n in events if n < 0}
    return tuple((i, n) for i, n in events if (n < 0 and i not in made) or (n >= 0 and i not in gone))


@_cached
def _made(events: Events) -> Events:
    """The allocations a phase keeps (the gradients a backward leaves)."""
    return tuple((i, n) for i, n in _net(events) if n >= 0)


@_cached
def _held(events: Events) -> Tuple[int, ...]:
    """The ids a forward leaves allocated (what its backward needs)."""
    return tuple(i for i, n in _net(events) if n >= 0)


@_cached
def _grad_in(trace: CellTrace) -> Events:
    """What a backward keeps besides its parameter gradients: its input's gradient."""
    params = set(trace.param_grads)
    return tuple((i, n) for i, n in _made(trace.backward) if i not in params)


@dataclass(frozen=True)
class _Run:
    """A phase's last full run on a device: its allocated peak above its start, and what it left allocated."""

    rise: int
    allocated: int
    requested: int


class _Replay:
    """The trace of a row's steps, fed to one allocator per device as it is built (no trace list is kept)."""

    def __init__(
        self,
        traces: Sequence[Sequence[CellTrace]],
        slots: Sequence[int],
        settings: AllocatorSettings,
        repeats: bool,
    ) -> None:
        self.traces, self.slot = traces, list(slots)
        self.m, self.n = len(traces), len(traces[0])
        self.alloc = [Allocator(settings) for _ in range(max(self.slot) + 1)]
        self._base = 0
        self.repeats = repeats
        self._last: Dict[Tuple[int, int], _Run] = {}  # (device, phase) -> its last full run, if it made no segment

    # -- keys -------------------------------------------------------------------------------------

    def namespace(self) -> int:
        """A fresh key range for one cell's ids (meter serials are below 2**40)."""
        self._base += 1 << 40
        return self._base

    def run(self, j: int, events: Events, base: int) -> None:
        """One cell phase on partition ``j``'s device: in full, or by its net effect when it repeats (see :func:`replay_steps`)."""
        allocator = self.alloc[self.slot[j]]
        seen = (self.slot[j], id(events))
        last = self._last.get(seen) if self.repeats else None
        start, requested, reserved = allocator.allocated, allocator.requested, allocator.reserved
        if last is None:
            peak = allocator.peak_allocated
            allocator.peak_allocated = start
            _run(allocator, events, base)
            rise = allocator.peak_allocated - start
            allocator.peak_allocated = max(peak, allocator.peak_allocated)
            last = _Run(rise, allocator.allocated - start, allocator.requested - requested)
        else:
            _run(allocator, _net(events), base)
            allocator.peak_allocated = max(allocator.peak_allocated, start + last.rise)
        if allocator.reserved == reserved:
            self._last[seen] = last
        else:  # it took a new segment: the next one runs in full
            self._last.pop(seen, None)

    def steady(self, j: int, trace: CellTrace) -> bool:
        """Whether ``trace``'s backward and forward both last ran on ``j``'s device without a new segment."""
        dev = self.slot[j]
        return self.repeats and (dev, id(trace.backward)) in self._last and (dev, id(trace.forward)) in self._last

    def backward_handing_over(self, j: int, trace: CellTrace, base: int, added_in_place: bool) -> None:
        """A backward whose activations the next recompute on its device takes over (:meth:`recompute_taking_over`).

        Only what outlives it is placed (the gradients); its activations stay where
        they are, their peak counted as its last full run's. ``added_in_place``:
        its parameter gradients are added into ``.grad`` and released at once, so
        they are not placed at all (placing and releasing them leaves the blocks
        as they were, and the last full run placed them without a new segment).
        """
        allocator = self.alloc[self.slot[j]]
        run = self._last[(self.slot[j], id(trace.backward))]
        peak = max(allocator.peak_allocated, allocator.allocated + run.rise)
        _run(allocator, _grad_in(trace) if added_in_place else _made(trace.backward), base)
        allocator.peak_allocated = peak  # placed beside activations the full run had released by then

    def recompute_taking_over(self, j: int, trace: CellTrace, old: int, base: int) -> None:
        """A recompute that takes the blocks of the backward just before it on its device, same trace.

        Why: a recompute and the backward before it on a worker alternate through
        the drain; once both have run without a new segment, the recompute's
        activations fill what the backward's freed, block for block. Renaming the
        blocks instead of freeing and placing each one keeps the published rows'
        replays to seconds.
        """
        allocator = self.alloc[self.slot[j]]
        run = self._last[(self.slot[j], id(trace.forward))]
        allocator.peak_allocated = max(allocator.peak_allocated, allocator.allocated - run.allocated + run.rise)
        for k in _held(trace.forward):
            allocator.rename(old + k, base + k)

    def malloc(self, j: int, key: Hashable, nbytes: int, stream: Hashable = _COMPUTE) -> None:
        self.alloc[self.slot[j]].malloc(key, nbytes, stream)

    def free(self, j: int, key: Hashable) -> None:
        self.alloc[self.slot[j]].free(key)

    def crosses(self, a: int, b: int) -> bool:
        """Whether a tensor passed from partition ``a`` to ``b`` is copied (partitions on distinct GPUs)."""
        return self.slot[a] != self.slot[b]


#: The environment variable users set the allocator with; predictions read it as the allocator does.
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def settings_for(era: str, environ: Optional[Mapping[str, str]] = None) -> AllocatorSettings:
    """The allocator settings a prediction for ``era`` follows: today's read ``PYTORCH_CUDA_ALLOC_CONF``.

    Era 1.3 had no settings, so the variable (which describes the user's own
    set-up) is not applied to it. ValueError names a bad key or value.
    """
    if era == ERA_1_3:
        return AllocatorSettings(era=ERA_1_3)
    return AllocatorSettings.parse((environ if environ is not None else os.environ).get(ALLOC_CONF, ""), era)


def allocator_for(era: str, devices: Iterable[str]) -> Optional[AllocatorSettings]:
    """The settings predictions for rows on ``devices`` follow: None when none of them is a GPU (no caching
    allocator to model, and a variable meant for GPUs is not read); a bad variable is a HarnessError."""
    if not any(d.startswith("cuda") for d in devices):
        return None
    try:
        return settings_for(era)
    except ValueError as error:
        raise HarnessError(f"{error}; fix or unset the variable") from None


def replay_steps(
    traces: Sequence[Sequence[CellTrace]],
    checkpoint_stop: int,
    model: ModelState,
    setup: Setup,
    *,
    slots: Optional[Sequence[int]] = None,
    input_bytes: int = 0,
    head_bytes: int = 0,
    repeats: bool = True,
) -> Reserved:
    """Replay ``setup.steps`` training steps of the fill-drain schedule over ``traces[i][j]`` (micro-batch, partition).

    ``slots[j]``: partition ``j``'s device (default: one each); tensors crossing
    partitions on different devices are copied (distinct GPUs). cuBLAS's
    workspace is allocated on the last device (the classifier's matrix product).

    ``repeats`` (the shortcuts that make the published rows' replays take
    seconds, not minutes): a phase that ran in full on a device without taking
    a new segment runs by its net effect the next times it comes (the same
    trace: micro-batches of one size), its allocated peak taken as the last
    full run's rise: the releases of what it did not allocate and the
    allocations it keeps, in order. Through the drain, a recompute takes over
    the blocks of the backward just before it on its device
    (:meth:`_Replay.recompute_taking_over`), and gradients added in place at once
    are not placed. On the published AmoebaNet-D rows, against the full replay
    (``repeats=False``, 20-60 times slower), peak reserved moves by 0.9% at most
    and peak allocated by 0.8%, in both eras; tests hold tiny models to 2%.
    """
    n = len(traces[0])
    r = _Replay(traces, slots if slots is not None else list(range(n)), setup.settings, repeats)
    legacy = setup.legacy
    steps, workspace = setup.steps, setup.workspace
    grads: List[List[Tuple[Hashable, int]]] = [[] for _ in range(n)]  # .grad per partition: (key, bytes)
    for j in range(n):
        for k, nbytes in enumerate(model.params[j]):
            r.malloc(j, ("param", j, k), nbytes)
    if input_bytes:
        r.malloc(0, ("input",), input_bytes)
    for step in range(steps):
        if not legacy:  # zero_grad(set_to_none=True)
            for j in range(n):
                for key, _ in grads[j]:
                    r.free(j, key)
                grads[j] = []
        _step(r, step, checkpoint_stop, grads, legacy, head_bytes, workspace if step == 0 else 0)
        _optimizer_step(r, model, step, setup.foreach and not legacy)
    model_bytes = [0] * len(r.alloc)
    for j in range(n):
        model_bytes[r.slot[j]] += sum(model.params[j]) * (2 + model.state_buffers)
    return Reserved([a.stats() for a in r.alloc], model_bytes)


def _step(
    r: _Replay,
    step: int,
    stop: int,
    grads: List[List[Tuple[Hashable, int]]],
    legacy: bool,
    head_bytes: int,
    workspace: int,
) -> None:
    """One training step's forward, loss and backward, in the schedule's order."""
    m, n = r.m, r.n
    base: Dict[Tuple[int, int], int] = {}
    later: List[Tuple[int, Hashable]] = []
    for steps in forward_steps(m, n):
        for s in steps:
            i, j = s.i, s.j
            t = r.traces[i][j]
            base[(i, j)] = ns = r.namespace()
            if j > 0 and r.crosses(j - 1, j):
                prev = r.traces[i][j - 1]
                r.malloc(j, ("in", step, i, j), sum(prev.sizes[k] for k in prev.out), _INCOMING)
            if i < stop:
                r.run(j, t.nograd, ns)
                if j < n - 1 and r.crosses(j, j + 1):  # copied to the next device: nothing else holds it
                    later.extend((j, ns + k) for k in t.out)
            else:
                r.run(j, t.forward, ns)
        _release(r, later)
    last = n - 1
    if head_bytes:
        r.malloc(last, ("head", step), head_bytes)
    if workspace:
        for handle in _CUBLAS_HANDLES:
            r.malloc(last, ("cublas", handle), workspace)
    done = [0] * n
    handed: Dict[Tuple[int, int], int] = {}  # recompute (i, j) -> the backward whose blocks it takes
    clocks = backward_steps(m, n, lambda i: i < stop)
    followed = _followed_by_recompute(clocks, r.slot)
    for steps in clocks:
        for s in steps:
            i, j = s.i, s.j
            t = r.traces[i][j]
            ns = base[(i, j)]
            if s.kind == "recompute":
                old = handed.pop((i, j), None)
                if old is not None:
                    r.recompute_taking_over(j, t, old, ns)
                else:
                    r.run(j, t.forward, ns)
                if j == last:
                    for k in t.out:  # the recomputed output replaces the checkpointed one
                        r.free(j, ns + k)
                continue
            arriving = j < last and r.crosses(j, j + 1)
            if arriving:
                nxt = r.traces[i][j + 1]
                r.malloc(j, ("grad", step, i, j), sum(nxt.sizes[k] for k in nxt.grad_in), _INCOMING)
            # Handing over needs nothing placed between the backward and the recompute: not the
            # gradient sums today's accumulation makes at a partition's second backward.
            sums = not legacy and done[j] == 1
            in_place = bool(grads[j]) if legacy else done[j] >= 2
            fresh: List[Tuple[Hashable, int]] = [(ns + k, t.sizes[k]) for k in t.param_grads]
            if (i, j) in followed and r.traces[i - 1][j] is t and not sums and r.steady(j, t):
                r.backward_handing_over(j, t, ns, in_place)
                handed[(i - 1, j)] = ns
                fresh = [] if in_place else fresh
            else:
                r.run(j, t.backward, ns)
            if arriving:
                r.free(j, ("grad", step, i, j))
            if j > 0 and r.crosses(j - 1, j):
                r.free(j, ("in", step, i, j))
            _accumulate(r, j, step, done[j], fresh, grads, legacy)
            done[j] += 1
            if j < last:
                nxt = r.traces[i][j + 1]
                later.extend((j + 1, base[(i, j + 1)] + k) for k in nxt.grad_in)
            if j > 0 and i < stop and not r.crosses(j - 1, j):
                prev = r.traces[i][j - 1]
                later.extend((j - 1, base[(i, j - 1)] + k) for k in prev.out)  # the checkpointed input it took
        _release(r, later)
    if head_bytes:
        r.free(last, ("head", step))


def _followed_by_recompute(clocks: Sequence[Sequence[Step]], slot: Sequence[int]) -> Set[Tuple[int, int]]:
    """Backwards ``(i, j)`` whose device's next step is the recompute of ``(i - 1, j)``.

    A partition's recompute runs a clock before its backward, after the
    backward of the clock (the last partition's: in its backward's clock,
    just before it), so through the drain a worker alternates between the two.
    """
    last: Dict[int, Step] = {}
    out: Set[Tuple[int, int]] = set()
    for steps in clocks:
        for step in steps:
            before = last.get(slot[step.j])
            if (
                before is not None
                and before.kind == "backward"
                and step.kind == "recompute"
                and (step.i, step.j) == (before.i - 1, before.j)
            ):
                out.add((before.i, before.j))
            last[slot[step.j]] = step
    return out


def _release(r: _Replay, later: List[Tuple[int, Hashable]]) -> None:
    """Releases deferred to the end of a clock (concurrent devices may release in either order)."""
    for j, key in later:
        r.free(j, key)
    later.clear()


def _accumulate(
    r: _Replay,
    j: int,
    step: int,
    done: int,
    fresh: List[Tuple[Hashable, int]],
    grads: List[List[Tuple[Hashable, int]]],
    legacy: bool,
) -> None:
    """One micro-batch's parameter gradients of partition ``j`` added into ``grads[j]``.

    Today's engine: the first set is kept, the second summed out of place with it
    (new tensors: ``.grad``), later ones in place. Autograd's (era 1.3, ``.grad``
    kept across steps): the very first set becomes ``.grad``, every other one is
    added in place.
    """
    if legacy:
        if not grads[j]:
            grads[j] = fresh
            return
        for key, _ in fresh:
            r.free(j, key)
        return
    if done == 0:
        grads[j] = fresh
        return
    if done == 1:
        sums: List[Tuple[Hashable, int]] = [(("sum", step, j, k), nbytes) for k, (_, nbytes) in enumerate(fresh)]
        for key, nbytes in sums:
            r.malloc(j, key, nbytes)
        for key, _ in grads[j] + fresh:
            r.free(j, key)
        grads[j] = sums
        return
    for key, _ in fresh:
        r.free(j, key)


def _optimizer_step(r: _Replay, model: ModelState, step: int, foreach: bool) -> None:
    """RMSprop's step per partition: its buffers at the first step, its temporaries every step."""
    for j, sizes in enumerate(model.params):
        if step == 0:
            for b in range(model.state_buffers):
                for k, nbytes in enumerate(sizes):
                    r.malloc(j, ("state", b, j, k), nbytes)
        temps = [(("temp", step, j, k), nbytes) for k, nbytes in enumerate(sizes)]
        if foreach:
            for key, nbytes in temps:
                r.malloc(j, key, nbytes)
            for key, _ in temps:
                r.free(j, key)
        else:
            for key, nbytes in temps:
                r.malloc(j, key, nbytes)
                r.free(j, key)
