"""Run the partitions over the micro-batches: forward cells, then backward cells.

The autograd graph is cut at every partition boundary: each cell (micro-batch
``i`` on partition ``j``) starts from detached leaf tensors and builds a graph
of its own. The cells are joined to the caller's graph by one autograd
Function (:class:`_Join`) whose inputs are the caller's input tensors and the
model's parameters, and whose backward runs the backward schedule: each cell's
``torch.autograd.grad`` runs on the worker of that cell's device, recomputing
first when the cell was checkpointed, and hands its input gradients to the
previous partition.

Why not leave the backward to one autograd call over a connected graph (as
torchgpipe does)? PyTorch runs all CPU backward work in the single thread that
called ``backward()``; only CUDA devices get autograd threads of their own. A
connected graph therefore serialises the backward of every CPU partition, and
virtual CPU devices could never overlap more than the forward. Scheduling the
backward ourselves makes the pipeline the same on CPU and CUDA, and makes the
order of every step explicit (the same task list gives 1F1B later).

Parameter gradients are returned through the Function rather than written
into ``.grad`` directly, so ``torch.autograd.grad(loss, model.parameters())``
and gradient hooks behave exactly as with the plain model.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import DeferredBatchNorm
from .checkpoint import CPU_RNG_LOCK, RNGState, checkpointing, recomputing
from .copy import CopyStreams, storage_device, transfer, worker_groups
from .grad import cell_grad
from .microbatch import TensorOrTensors, Tensors, unpack
from .observe import Observer, StepRecord, observers
from .schedule import Step, backward_steps, forward_steps
from .skip.layout import SkipLayout
from .skip.skippable import Skippable
from .skip.tracker import SkipKey, SkipTracker, use_skip_tracker
from .stream import AbstractStream, Event, current_stream, record_event, record_ready, record_stream, wait_event
from .worker import cpu_worker_threads, execute

__all__ = ["Pipeline"]

_NO_CONTEXT = nullcontext()


class _CellTracker(SkipTracker):
    """A cell's skip tracker: tensors bound for later partitions are kept aside."""

    def __init__(self, incoming: Dict[SkipKey, Optional[Tensor]], outgoing: Sequence[SkipKey]) -> None:
        super().__init__()
        self.tensors.update(incoming)
        self._outgoing = set(outgoing)
        self.leaving: Dict[SkipKey, Optional[Tensor]] = {}

    def save(self, key: SkipKey, tensor: Optional[Tensor]) -> None:
        if key in self._outgoing:
            self.leaving[key] = tensor
        else:
            super().save(key, tensor)


class _Cell:
    """What one (micro-batch, partition) keeps between its forward and its backward."""

    __slots__ = (
        "inputs",
        "in_atomic",
        "skips_in",
        "outputs",
        "out_atomic",
        "out_grad",
        "skips_out",
        "rng",
        "event",
        "grads_in",
        "skip_grads_in",
        "grad_event",
    )

    def __init__(self) -> None:
        self.inputs: Tensors = ()
        self.in_atomic = True
        self.skips_in: Dict[SkipKey, Optional[Tensor]] = {}
        self.outputs: Tensors = ()
        self.out_atomic = True
        # Whether each output carries gradient to the next partition (known before a recompute).
        self.out_grad: Tuple[bool, ...] = ()
        self.skips_out: Dict[SkipKey, Optional[Tensor]] = {}
        self.rng: Optional[RNGState] = None
        self.event: Event = None
        self.grads_in: Tuple[Optional[Tensor], ...] = ()
        self.skip_grads_in: Dict[SkipKey, Optional[Tensor]] = {}
        self.grad_event: Event = None


def _differentiable(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _leaf(t: Tensor, requires_grad: bool) -> Tensor:
    return t.detach().requires_grad_(requires_grad and _differentiable(t))


def _check_output(value: Any, j: int) -> Tuple[Tensors, bool]:
    if isinstance(value, Tensor):
        return (value,), True
    if isinstance(value, tuple) and all(isinstance(x, Tensor) for x in value):
        return value, False
    raise TypeError(f"partition {j} returned {type(value).__name__}; layers must return a Tensor or a tuple of Tensors")


class _ThreadState:
    """Thread-local settings of the caller that worker threads must share: autocast.

    PyTorch hands autocast to its own autograd threads; the workers take the
    caller's settings the same way, so a mixed-precision step is the same
    step on the pipeline. Other thread-local observers (a memory meter, a
    tracer) attach to the workers through :mod:`.observe`.
    """

    def __init__(self) -> None:
        self.autocast: List[Tuple[str, bool, torch.dtype]] = []
        for device_type in ("cpu", "cuda"):
            if device_type == "cuda" and not torch.cuda.is_available():
                continue
            enabled = torch.is_autocast_enabled(device_type)
            self.autocast.append((device_type, enabled, torch.get_autocast_dtype(device_type)))

    def enter(self, stack: ExitStack) -> None:
        for device_type, enabled, dtype in self.autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))


class _Run:
    """The state of one forward call that its backward needs."""

    def __init__(self, m: int, checkpoint_stop: int, thread_state: _ThreadState) -> None:
        self.m = m
        self.checkpoint_stop = checkpoint_stop
        self.thread_state = thread_state
        self.cells: Dict[Tuple[int, int], _Cell] = {}
        self.input_devices: Tuple[torch.device, ...] = ()
        self.input_needs_grad: Tuple[bool, ...] = ()
        self.params: List[List[nn.Parameter]] = []
        self.done = False
        # Partitions seen drawing from the host generator (see Pipeline._forward_rng).
        self.draws_random: Set[int] = set()
        # Per device, the event of the last cell its worker finished in the current phase: one
        # compute stream per device, so it orders everything the device did before it.
        self.last_event: Dict[torch.device, Event] = {}


class Pipeline:
    """The partitions of one GPipe placed on their devices, and the workers that run them."""

    def __init__(
        self,
        partitions: Sequence[nn.Sequential],
        devices: Sequence[torch.device],
        skip_layout: SkipLayout,
    ) -> None:
        self.partitions = partitions
        self.devices = list(devices)
        self.places = [storage_device(d) for d in self.devices]
        self.skip_layout = skip_layout
        # One worker per distinct device; repeated devices share one (and one stream).
        self.worker_devices, self.worker_of = worker_groups(self.devices)
        self._one_worker = len(self.worker_devices) == 1
        # With more than one worker, partitions' draws from the host's one generator (and a
        # recompute's swap of it, GPU partitions' too) could interleave with another worker's.
        self._rng_shared = len(self.worker_devices) > 1
        self._deferred = [[m for m in p.modules() if isinstance(m, DeferredBatchNorm)] for p in partitions]
        self._plain_bn = [
            [m for m in p.modules() if isinstance(m, _BatchNorm) and not isinstance(m, DeferredBatchNorm)]
            for p in partitions
        ]
        self._copy_streams: Optional[CopyStreams] = None
        # Partitions with no skippable layer never read a skip tracker: theirs is not set up.
        self._skippable = [any(isinstance(m, Skippable) for m in p.modules()) for p in partitions]

    # -- plumbing -------------------------------------------------------

    def _streams(self) -> CopyStreams:
        # Made on the caller's thread before any worker starts, so workers only read them.
        if self._copy_streams is None:
            self._copy_streams = CopyStreams(self.places)
        return self._copy_streams

    def _contexts(self, state: _ThreadState, phase: str, watching: Sequence[Observer]) -> List[Callable[[], ExitStack]]:
        threads = cpu_worker_threads(self.worker_devices, torch.get_num_threads())
        parallel = len(self.worker_devices) > 1

        def make(w: int, device: torch.device) -> Callable[[], ExitStack]:
            def context() -> ExitStack:
                stack = ExitStack()
                # Each worker runs its cells' backward itself. Otherwise PyTorch hands the GPU
                # work of a torch.autograd.grad call to its autograd thread for that device,
                # which may be the very thread blocked in _Join.backward waiting for this
                # worker: with two or more GPUs the backward would deadlock. The switch is
                # per thread (torch >= 2.0); the caller's own setting is untouched.
                stack.enter_context(torch.autograd.set_multithreading_enabled(False))
                if device.type == "cuda":
                    stack.enter_context(torch.cuda.device(device))
                elif parallel:
                    # Split the caller's intra-op threads among the CPU workers so that
                    # partitions running at once do not oversubscribe the cores. The
                    # setting is per thread: the caller's own count is untouched.
                    torch.set_num_threads(threads)
                state.enter(stack)
                for observer in watching:
                    stack.enter_context(observer.worker(w, device, phase))
                return stack

            return context

        return [make(w, d) for w, d in enumerate(self.worker_devices)]

    def _worker_steps(
        self, clocks: List[List[Step]], run_step: Callable[[Step], None], phase: str, watching: Sequence[Observer]
    ) -> List[List[Tuple[int, Callable[[], None]]]]:
        """Each worker's steps in order as (clock, function): what :func:`execute` runs."""
        mine: List[List[Tuple[int, Callable[[], None]]]] = [[] for _ in self.worker_devices]
        for clock, steps in enumerate(clocks):
            for step in steps:
                w = self.worker_of[step.j]
                fn = _bind(run_step, step)
                if watching:
                    fn = _reported(fn, phase, step, clock, w, self.devices[step.j], watching)
                mine[w].append((clock, fn))
        return mine

    def _record(self, compute: AbstractStream) -> Event:
        """A cell's event, for whoever uses its tensors on another stream.

        With one worker every cell runs inline on the caller's thread, so producer,
        consumer and caller share one stream per device: an event there orders nothing
        and costs a record (and a wait) per cell.
        """
        return None if self._one_worker else record_event(compute)

    def _handed(self, producer: int, consumer: int, event: Event) -> Event:
        """The event partition ``consumer`` waits for before reading ``producer``'s tensors.

        Partitions of one worker share its compute stream, so their order is the
        stream's own: no wait.
        """
        return None if self.worker_of[producer] == self.worker_of[consumer] else event

    @staticmethod
    def _join_caller(places: Sequence[torch.device], events: Sequence[Event]) -> None:
        """Order the calling thread's current streams on ``places`` after ``events``.

        The workers compute on their threads' streams; the caller (or the
        autograd thread running :class:`_Join`'s backward) may use other ones,
        e.g. under ``torch.cuda.stream(s)``. Every device's stream waits for
        every event: autograd takes all of ``_Join``'s gradients as made on one
        stream (its node's), whichever device holds them.
        """
        for place in dict.fromkeys(places):
            if place.type != "cuda":
                continue
            stream = current_stream(place)
            for event in events:
                wait_event(stream, event)

    def _forward_rng(self, i: int, j: int, run: _Run) -> AbstractContextManager[Any]:
        """Serialise host-generator draws of partitions that will be recomputed (see :meth:`_watched_rng`).

        Alone, or with nothing recomputed, there is nothing to serialise: no context at all.
        """
        if not (self._rng_shared and run.checkpoint_stop > 0):
            return _NO_CONTEXT
        return self._watched_rng(i, j, run)

    @contextmanager
    def _watched_rng(self, i: int, j: int, run: _Run) -> Iterator[None]:
        """Serialise host-generator draws of partitions that will be recomputed.

        Every worker shares the host's one generator (GPU partitions may draw
        from it too, and a recompute swaps it in to replay). If two partitions
        drew from it at once, neither recompute could replay its draws. Which
        partitions draw (dropout modules, functional dropout, ``torch.rand`` in
        a custom layer, ...) is found by watching, not by guessing from module
        types: each partition's first micro-batch runs under the lock and is
        marked random if the generator moved. Its later forwards and its
        recomputes take the lock; the others run freely. The first micro-batch
        of partition ``j`` runs alone at clock ``j`` among first micro-batches,
        and earlier partitions are already classified, so the watch is exact.
        """
        if i == 0:
            with CPU_RNG_LOCK:
                before = torch.get_rng_state()
                yield
                if not torch.equal(before, torch.get_rng_state()):
                    run.draws_random.add(j)
        elif j in run.draws_random:
            with CPU_RNG_LOCK:
                yield
        else:
            yield

    def _recompute_rng(self, j: int, run: _Run) -> Tuple[Any, bool]:
        """(lock to hold, whether to swap the host generator) for recomputing partition ``j``.

        Alone, a worker swaps the host generator freely. Next to other workers
        it swaps it only for a partition seen drawing from it, under the lock
        those draws take; a partition that never draws from it (a GPU
        partition, typically) leaves it alone, so it cannot disturb the others.
        """
        if not self._rng_shared:
            return nullcontext(), True
        if j in run.draws_random:
            return CPU_RNG_LOCK, True
        return nullcontext(), False

    # -- forward --------------------------------------------------------

    def forward(
        self, batches: List[Tensors], atomic: bool, checkpoint_stop: int, grad: bool
    ) -> Tuple[List[Tensors], bool, _Run]:
        """Run every forward cell; return the last partition's outputs per micro-batch."""
        m, n = len(batches), len(self.partitions)
        run = _Run(m, checkpoint_stop if grad else 0, _ThreadState())
        streams = self._streams()
        first = batches[0]
        run.input_devices = tuple(t.device for t in first)
        input_ready = record_ready(first)

        def step(s: Step) -> None:
            i, j = s.i, s.j
            cell = _Cell()
            place = self.places[j]
            compute = current_stream(place)
            if j == 0:
                source, ready, in_atomic = batches[i], input_ready, atomic
                wants = tuple(t.requires_grad for t in source)
            else:
                prev = run.cells[(i, j - 1)]
                source, ready, in_atomic = prev.outputs, self._handed(j - 1, j, prev.event), prev.out_atomic
                wants = prev.out_grad
            inputs = transfer(source, place, ready, streams, compute)
            checkpointed = i < run.checkpoint_stop
            if j > 0 and checkpointed:
                # A checkpointed cell's outputs are recomputed before its backward: once
                # handed on, the first copy need not stay on its device until then.
                run.cells[(i, j - 1)].outputs = ()
            skips: Dict[SkipKey, Optional[Tensor]] = {}
            for key, src in self.skip_layout.incoming(j):
                origin = run.cells[(i, src)]
                value = origin.skips_out.pop(key) if checkpointed else origin.skips_out[key]
                if value is not None:
                    (value,) = transfer((value,), place, self._handed(src, j, origin.event), streams, compute)
                    if grad:
                        value = _leaf(value, True)
                skips[key] = value
            if grad:
                inputs = tuple(_leaf(t, w) for t, w in zip(inputs, wants))
            cell.inputs, cell.in_atomic, cell.skips_in = inputs, in_atomic, skips

            # Each context below is entered only where it changes something: a host-bound
            # step pays for every one of them once per cell.
            tracker = _CellTracker(skips, list(self.skip_layout.outgoing(j))) if self._skippable[j] else None
            with self._forward_rng(i, j, run), use_skip_tracker(tracker) if tracker is not None else _NO_CONTEXT:
                if checkpointed:
                    cell.rng = RNGState(place)
                    with torch.no_grad(), checkpointing():
                        output = self.partitions[j](unpack(inputs, in_atomic))
                else:
                    with _NO_CONTEXT if torch.is_grad_enabled() == grad else torch.set_grad_enabled(grad):
                        output = self.partitions[j](unpack(inputs, in_atomic))
            cell.outputs, cell.out_atomic = _check_output(output, j)
            if checkpointed:
                # The graph is rebuilt later; until then assume every float output carries gradient.
                cell.out_grad = tuple(_differentiable(t) for t in cell.outputs)
            else:
                cell.out_grad = tuple(t.requires_grad for t in cell.outputs)
            if tracker is not None:
                cell.skips_out = tracker.leaving
            cell.event = self._record(compute)
            run.cells[(i, j)] = cell
            run.last_event[place] = cell.event

        clocks = forward_steps(m, n)
        watching = observers()
        execute(
            self._worker_steps(clocks, step, "forward", watching),
            self._contexts(run.thread_state, "forward", watching),
            len(clocks),
        )

        # The caller's streams may differ from the workers': order each device's after the last
        # cell its worker ran there, before committing BatchNorm statistics (the commit runs on
        # the caller's stream and reads what every worker accumulated) and before the caller
        # reads the outputs. The last partition's device alone is not enough: a commit on
        # another GPU would race that GPU's worker.
        self._join_caller(self.places, list(run.last_event.values()))
        if any(p.training for p in self.partitions):
            for layers in self._deferred:
                for bn in layers:
                    bn.commit()

        # Tell the allocator that the caller's stream reads the outputs the last worker made.
        outputs = [run.cells[(i, n - 1)].outputs for i in range(m)]
        if self.places[-1].type == "cuda":
            caller = current_stream(self.places[-1])
            for out in outputs:
                for t in out:
                    record_stream(t, caller)
        out_atomic = run.cells[(0, n - 1)].out_atomic
        if not grad:
            run.cells.clear()
        return outputs, out_atomic, run

    # -- backward -------------------------------------------------------

    def backward(
        self, run: _Run, grad_outputs: Sequence[Optional[Tensor]]
    ) -> Tuple[List[Optional[Tensor]], List[List[Optional[Tensor]]]]:
        """Run every backward cell; return (input gradients, parameter gradients per partition)."""
        if run.done:
            raise RuntimeError(
                "GPipe's graph has already been backwarded; retain_graph=True is not supported by the pipeline"
            )
        run.done = True
        m, n = run.m, len(self.partitions)
        # Only the sizes: holding the last partition's outputs here would keep every cell's graph
        # (and, through its leaves, the previous partition's outputs) alive until the end of the backward.
        sizes_of = [[t.size(0) for t in run.cells[(i, n - 1)].outputs] for i in range(m)]
        slices: List[List[Optional[Tensor]]] = [[] for _ in range(m)]
        for k, g in enumerate(grad_outputs):
            if g is None:
                for i in range(m):
                    slices[i].append(None)
                continue
            sizes = [s[k] for s in sizes_of]
            for i, piece in enumerate(torch.split(g, sizes)):
                slices[i].append(piece)
        grads_ready = record_ready(grad_outputs)
        streams = self._streams()
        run.last_event = {}
        param_grads: List[List[Optional[Tensor]]] = [[None] * len(ps) for ps in run.params]
        owned: List[List[bool]] = [[False] * len(ps) for ps in run.params]

        def recompute(i: int, j: int) -> None:
            cell = run.cells[(i, j)]
            assert cell.rng is not None
            tracker = _CellTracker(cell.skips_in, list(self.skip_layout.outgoing(j))) if self._skippable[j] else None
            lock, host = self._recompute_rng(j, run)
            plain_bn = self._plain_bn[j]
            with (
                lock,
                use_skip_tracker(tracker) if tracker is not None else _NO_CONTEXT,
                cell.rng.replay(host),
                torch.enable_grad() if not torch.is_grad_enabled() else _NO_CONTEXT,
                recomputing(),
                _frozen_running_stats(plain_bn) if plain_bn else _NO_CONTEXT,
            ):
                output = self.partitions[j](unpack(cell.inputs, cell.in_atomic))
            cell.outputs, _ = _check_output(output, j)
            if tracker is not None:
                cell.skips_out = tracker.leaving

        def backward(i: int, j: int) -> None:
            cell = run.cells[(i, j)]
            place = self.places[j]
            compute = current_stream(place)
            pairs: List[Tuple[Tensor, Tensor]] = []

            def take(tensors: Sequence[Tensor], grads: Sequence[Optional[Tensor]], ready: Event) -> None:
                present = [(t, g) for t, g in zip(tensors, grads) if g is not None and t.requires_grad]
                if not present:
                    return
                moved = transfer(tuple(g for _, g in present), place, ready, streams, compute)
                pairs.extend(zip((t for t, _ in present), moved))

            if j == n - 1:
                take(cell.outputs, slices[i], grads_ready)
            else:
                nxt = run.cells[(i, j + 1)]
                take(cell.outputs, nxt.grads_in, self._handed(j + 1, j, nxt.grad_event))
            for key, tensor in cell.skips_out.items():
                if tensor is None:
                    continue
                dst = self.skip_layout.routes[key][1]
                popper = run.cells[(i, dst)]
                # Consumed here, so released here: held to the end of the backward, a skip's
                # gradient would pile up once per micro-batch on the popping device.
                take((tensor,), (popper.skip_grads_in.pop(key, None),), self._handed(dst, j, popper.grad_event))

            leaves = [t for t in cell.inputs if t.requires_grad]
            skip_leaves = [(k, t) for k, t in cell.skips_in.items() if t is not None and t.requires_grad]
            params = run.params[j]
            wrt: List[Tensor] = leaves + [t for _, t in skip_leaves] + list(params)
            grads: Sequence[Optional[Tensor]]
            if pairs and wrt:
                grads = cell_grad([t for t, _ in pairs], wrt, [g for _, g in pairs])
            else:
                grads = (None,) * len(wrt)

            it = iter(grads)
            cell.grads_in = tuple(next(it) if t.requires_grad else None for t in cell.inputs)
            cell.skip_grads_in = {k: next(it) for k, _ in skip_leaves}
            _accumulate(param_grads[j], owned[j], list(it))
            # Free what this cell held; the successor's gradients are consumed too.
            cell.outputs, cell.skips_out, cell.inputs, cell.skips_in = (), {}, (), {}
            if j < n - 1:
                run.cells[(i, j + 1)].grads_in = ()
            cell.grad_event = self._record(compute)
            run.last_event[place] = cell.grad_event

        def step(s: Step) -> None:
            (recompute if s.kind == "recompute" else backward)(s.i, s.j)

        clocks = backward_steps(m, n, lambda i: i < run.checkpoint_stop)
        watching = observers()
        execute(
            self._worker_steps(clocks, step, "backward", watching),
            self._contexts(run.thread_state, "backward", watching),
            len(clocks),
        )

        # Every device's gradients are handed to autograd on this thread's streams: order them
        # after every worker's last cell, and record what they read from the workers' streams.
        self._join_caller([*self.places, *run.input_devices], list(run.last_event.values()))
        for grads, place in zip(param_grads, self.places):
            if place.type == "cuda":
                for grad in grads:
                    if grad is not None:
                        record_stream(grad, current_stream(grad.device))
        input_grads: List[Optional[Tensor]] = []
        for k, device in enumerate(run.input_devices):
            pieces = [run.cells[(i, 0)].grads_in[k] for i in range(m)]
            if any(p is None for p in pieces):
                input_grads.append(None)
                continue
            present = [cast(Tensor, p) for p in pieces]
            for t in present:
                if t.is_cuda:
                    record_stream(t, current_stream(t.device))
            joined = torch.cat(present)
            input_grads.append(joined.to(device) if joined.device != device else joined)
        run.cells.clear()
        return input_grads, param_grads


@contextmanager
def _frozen_running_stats(layers: Sequence[_BatchNorm]) -> Iterator[None]:
    """Keep a recompute from updating plain BatchNorm running statistics a second time.

    A BatchNorm that does not track statistics normalises a training batch
    exactly as one that does, so the recomputed graph is unchanged.
    """
    tracking = [bn.track_running_stats for bn in layers]
    for bn in layers:
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn, flag in zip(layers, tracking):
            bn.track_running_stats = flag


def _accumulate(acc: List[Optional[Tensor]], owned: List[bool], grads: Sequence[Optional[Tensor]]) -> None:
    """Add one micro-batch's parameter gradients into ``acc``, in two fused calls.

    One ``add_`` per parameter per micro-batch is ~314 x chunks kernel launches
    a step for ResNet-101; the multi-tensor ops do the same sums in a few.
    The first gradient of a parameter is kept as it is; it may alias
    autograd's buffers, so the second is summed out of place into a tensor we
    own, and later ones in place.
    """
    into: List[int] = []
    fresh: List[int] = []
    for p, g in enumerate(grads):
        if g is None:
            continue
        if acc[p] is None:
            acc[p] = g
        elif owned[p]:
            into.append(p)
        else:
            fresh.append(p)
    if into:
        torch._foreach_add_([cast(Tensor, acc[p]) for p in into], [cast(Tensor, grads[p]) for p in into])
    if fresh:
        sums = torch._foreach_add([cast(Tensor, acc[p]) for p in fresh], [cast(Tensor, grads[p]) for p in fresh])
        for p, total in zip(fresh, sums):
            acc[p], owned[p] = total, True


def _bind(fn: Callable[[Step], None], step: Step) -> Callable[[], None]:
    return lambda: fn(step)


def _reported(
    fn: Callable[[], None],
    phase: str,
    step: Step,
    clock: int,
    worker: int,
    device: torch.device,
    watching: Sequence[Observer],
) -> Callable[[], None]:
    def run() -> None:
        with ExitStack() as around:
            for observer in watching:
                around.enter_context(observer.around(phase, step.kind, step.i, step.j, clock, worker, device))
            start = time.perf_counter_ns()
            try:
                fn()
            finally:
                end = time.perf_counter_ns()
                record = StepRecord(phase, step.kind, step.i, step.j, clock, worker, device, start, end)
                for observer in watching:
                    observer.step(record)

    return run


class _Join(torch.autograd.Function):
    """Joins the cut per-cell graphs to the caller's graph; its backward runs the pipeline's."""

    @staticmethod
    def forward(
        ctx: Any, pipeline: Pipeline, run: _Run, outputs: List[Tensors], n_inputs: int, *tensors: Tensor
    ) -> Any:
        ctx.pipeline, ctx.run, ctx.n_inputs = pipeline, run, n_inputs
        joined = tuple(torch.cat([out[k] for out in outputs]) for k in range(len(outputs[0])))
        ctx.mark_non_differentiable(*[t for t in joined if not _differentiable(t)])
        return joined

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Optional[Tensor]) -> Any:
        run: _Run = ctx.run
        input_grads, param_grads = ctx.pipeline.backward(run, grad_outputs)
        wanted = [g for g, w in zip(input_grads, run.input_needs_grad) if w]
        flat = [g for grads in param_grads for g in grads]
        return (None, None, None, None, *wanted, *flat)


def join(pipeline: Pipeline, run: _Run, outputs: List[Tensors], inputs: Tensors, atomic: bool) -> TensorOrTensors:
    """Connect the pipeline's outputs to ``inputs`` and the parameters in the caller's graph."""
    run.input_needs_grad = tuple(t.requires_grad for t in inputs)
    run.params = [[p for p in part.parameters() if p.requires_grad] for part in pipeline.partitions]
    tensors = [t for t in inputs if t.requires_grad] + [p for ps in run.params for p in ps]
    joined = _Join.apply(pipeline, run, outputs, len(inputs), *tensors)
    return unpack(tuple(joined), atomic)
