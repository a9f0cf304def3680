"""Recording one training step of our engine (or of the plain model) as a :class:`~gpipe_bench.timeline.model.Timeline`.

Why a measured step needs more than host times: on a CPU the engine's host
time per cell is its compute time, but on a GPU it is only the time spent
issuing kernels. :class:`TimelineRecorder` therefore records CUDA events on
each cell's stream through the hook's per-step context
(:mod:`gpipe_bench.pipe.observe`) and turns them into times on one axis (every
device's events against a reference taken while the devices were idle). Lane
``host`` is the caller's thread, in host time: the loss between the pipeline's
forward and backward, and whatever the caller marks (the optimizer step).

Why a module of its own: it needs torch and the engine's hook, which the data
model (and the simulator that builds timelines from it) does not.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from gpipe_bench.pipe.observe import Observer, StepRecord, observing
from gpipe_bench.timeline.model import Span, Timeline

__all__ = ["TimelineRecorder"]


def _lane(device: Any) -> str:
    """A device as a lane's name: as the user gave it, spelt the way torch spells it ('cpu:0', 'cuda:1')."""
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError):
        return str(device)


def _event(device: torch.device) -> "torch.cuda.Event":
    """A timing event recorded now on the calling thread's current stream of ``device``."""
    event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(device))
    return event


@dataclass
class _Mark:
    """A moment of the step: host time, and on CUDA an event on the stream the work went to."""

    ns: int
    event: Optional["torch.cuda.Event"] = None


class TimelineRecorder(Observer):
    """Records one training step as a :class:`Timeline`: the engine's cells through its hook, the caller's work.

    ::

        recorder = TimelineRecorder(devices=["cuda:0", "cuda:1"])
        with recorder.recording():
            loss_and_backward()               # every pipeline cell: forward, recompute, backward
            with recorder.host("optimizer"):  # the caller's own work, on lane 'host'
                optimizer.step()
        timeline = recorder.timeline("resnet101 pipeline-2")

    Lanes are the devices as the user gave them (``devices``, in that order;
    partitions sharing a device share its lane), then ``host``. Times are
    seconds from the start of :meth:`recording`. A CPU cell's times are its
    host times (the compute itself). A CUDA cell's are those of two events
    on its stream around it, put on the host's axis through a reference event
    per device recorded at the start while the devices were idle (devices not
    named in ``devices`` get theirs when first seen). A CUDA cell's start event
    is queued before its wait for its inputs, so its span starts no earlier
    than the cell that feeds it ended (the previous partition's forward, the
    next partition's backward); it still includes the copy of those inputs.

    The plain model (a row that does not split it) has no pipeline: see
    :meth:`model` for its forward and backward.
    """

    def __init__(self, devices: Sequence[str] = ()) -> None:
        self._devices = list(dict.fromkeys(_lane(d) for d in devices))
        self._lock = threading.Lock()
        self._local = threading.local()
        self._reset()

    def _reset(self) -> None:
        self._start_ns = 0
        self._references: Dict[str, Tuple["torch.cuda.Event", int]] = {}
        self._cells: List[Tuple[StepRecord, Optional[_Mark], Optional[_Mark]]] = []
        self._phases: List[Tuple[str, int, int]] = []  # (phase, entered ns, left ns), one per worker and phase
        self._host: List[Tuple[str, int, int]] = []
        self._plain: List[Tuple[str, Dict[str, _Mark]]] = []

    # -- the block ---------------------------------------------------------

    @contextmanager
    def recording(self) -> Iterator["TimelineRecorder"]:
        """Record the block: the step starts here (every CUDA device named is synchronised first)."""
        self._reset()
        cuda = [d for d in self._devices if d.startswith("cuda")]
        for device in cuda:
            torch.cuda.synchronize(device)
        self._start_ns = time.perf_counter_ns()
        for device in cuda:
            self._reference(torch.device(device))
        with observing(self):
            yield self

    def _reference(self, device: torch.device) -> None:
        lane = _lane(device)
        with self._lock:
            if lane not in self._references:
                self._references[lane] = (_event(device), time.perf_counter_ns())

    @contextmanager
    def host(self, label: str) -> Iterator[None]:
        """Mark the caller's work in the block as a span ``label`` (phase 'other') on lane 'host'."""
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self._host.append((label, start, time.perf_counter_ns()))

    @contextmanager
    def model(self, module: nn.Module, device: str) -> Iterator[None]:
        """Record a plain (unsplit) ``module`` on ``device`` for the block: one forward, one backward.

        Forward: from the module's forward pre-hook to its forward hook.
        Backward: from its output's gradient to the last parameter gradient
        accumulated. Between them, on lane 'host': the loss.
        """
        lane = _lane(device)
        place = torch.device(lane) if lane.startswith("cuda") else None
        marks: Dict[str, _Mark] = {}

        def mark(name: str, again: bool = False) -> None:
            if name in marks and not again:
                return
            event = None
            if place is not None:
                self._reference(place)
                event = _event(place)
            marks[name] = _Mark(time.perf_counter_ns(), event)

        def before(_module: nn.Module, _args: Any) -> None:
            mark("forward start")

        def after(_module: nn.Module, _args: Any, output: Any) -> None:
            if "forward end" in marks:
                return
            mark("forward end")
            if isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(lambda _grad: mark("backward start"))  # type: ignore[no-untyped-call]

        handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        for parameter in module.parameters():
            if parameter.requires_grad:
                # The last one accumulated ends the backward.
                hook = parameter.register_post_accumulate_grad_hook
                handles.append(hook(lambda _p: mark("backward end", True)))  # type: ignore[no-untyped-call]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._plain.append((lane, marks))

    # -- the engine's hook ---------------------------------------------------

    def worker(self, worker: int, device: torch.device, phase: str) -> AbstractContextManager[Any]:
        return self._phase(phase)

    @contextmanager
    def _phase(self, phase: str) -> Iterator[None]:
        entered = time.perf_counter_ns()
        try:
            yield
        finally:
            left = time.perf_counter_ns()
            with self._lock:
                self._phases.append((phase, entered, left))

    def around(
        self, phase: str, kind: str, i: int, j: int, clock: int, worker: int, device: torch.device
    ) -> AbstractContextManager[Any]:
        if device.type != "cuda":
            return nullcontext()
        return self._on_stream(device)

    @contextmanager
    def _on_stream(self, device: torch.device) -> Iterator[None]:
        self._reference(device)
        start = _Mark(0, _event(device))
        self._local.record = None
        try:
            yield
        finally:
            end = _Mark(0, _event(device))
            record: Optional[StepRecord] = self._local.record
            self._local.record = None
            if record is not None:
                with self._lock:
                    self._cells.append((record, start, end))

    def step(self, record: StepRecord) -> None:
        if record.device.type == "cuda":
            self._local.record = record  # its events are added when around() ends
            return
        with self._lock:
            self._cells.append((record, None, None))

    # -- the result ---------------------------------------------------------

    def timeline(self, title: str, meta: Optional[Dict[str, object]] = None) -> Timeline:
        """The recorded step as a :class:`Timeline` (waits for every CUDA device recorded to finish)."""
        for lane in self._references:
            torch.cuda.synchronize(lane)
        spans: List[Span] = []
        ends: Dict[Tuple[str, int, int], float] = {}
        timed = []
        for record, start, end in self._cells:
            lane = _lane(record.device)
            begin, finish = self._time(lane, start, record.start_ns), self._time(lane, end, record.end_ns)
            ends[(record.kind, record.i, record.j)] = finish
            timed.append((record, lane, begin, finish, start is not None))
        for record, lane, begin, finish, on_stream in timed:
            if on_stream:
                # The start event was queued before the wait for the cell's inputs: the stream may
                # reach it while the cell that feeds this one is still running on another device.
                feeder = (record.kind, record.i, record.j + (1 if record.kind == "backward" else -1))
                begin = min(max(begin, ends.get(feeder, begin)), finish)
            spans.append(Span(lane, record.kind, record.i, record.j, begin, finish))
        for lane, marks in self._plain:
            for phase, first, last in (
                ("forward", "forward start", "forward end"),
                ("backward", "backward start", "backward end"),
            ):
                if first in marks and last in marks:
                    a, b = marks[first], marks[last]
                    spans.append(Span(lane, phase, 0, 0, self._time(lane, a, a.ns), self._time(lane, b, b.ns)))
            if "forward end" in marks and "backward start" in marks:
                spans.append(self._host_span("loss", marks["forward end"].ns, marks["backward start"].ns))
        loss = self._loss()
        if loss is not None:
            spans.append(self._host_span("loss", *loss))
        spans += [self._host_span(label, start, end) for label, start, end in self._host]
        spans.sort(key=lambda s: (s.start, s.lane))
        lanes = list(dict.fromkeys([*self._devices, *(s.lane for s in spans if s.lane != "host")]))
        if any(s.lane == "host" for s in spans):
            lanes.append("host")
        cuda = bool(self._references) and any(s.lane in self._references for s in spans)
        details: Dict[str, object] = {"clock": "cuda events (devices), host (lane host)" if cuda else "host"}
        details.update(meta or {})
        return Timeline(title, spans, lanes, "measured", details)

    def _loss(self) -> Optional[Tuple[int, int]]:
        """The caller's time between the pipeline's forward and its backward: outputs joined, the loss, autograd."""
        forward = [left for phase, _, left in self._phases if phase == "forward"]
        backward = [entered for phase, entered, _ in self._phases if phase == "backward"]
        if not forward or not backward:
            return None
        begin, end = max(forward), min(backward)
        return (begin, end) if end > begin else None

    def _host_span(self, label: str, start_ns: int, end_ns: int) -> Span:
        return Span("host", "other", -1, -1, self._seconds(start_ns), self._seconds(end_ns), label)

    def _seconds(self, ns: int) -> float:
        return (ns - self._start_ns) / 1e9

    def _time(self, lane: str, mark: Optional[_Mark], ns: int) -> float:
        """Seconds from the step's start: the mark's event on the reference's device, else host time ``ns``."""
        if mark is None or mark.event is None or lane not in self._references:
            return self._seconds(ns)
        reference, reference_ns = self._references[lane]
        return self._seconds(reference_ns) + float(reference.elapsed_time(mark.event)) / 1e3
