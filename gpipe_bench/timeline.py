"""Timelines of one training step: what ran where and when, measured or simulated.

Why one data type for both: a measured step (recorded through the engine's
hook) and a simulated one (from :mod:`gpipe_bench.predict.simulate`) are only
comparable if they are drawn the same way. Both become a :class:`Timeline`,
a list of :class:`Span` per lane (a device, a link, the host), and both are
written by the same functions: a Chrome trace JSON that Perfetto and
``chrome://tracing`` open, and a PNG with one lane per device.

Why a measured step needs more than host times: on a CPU the engine's host
time per cell is its compute time, but on a GPU it is only the time spent
issuing kernels. :class:`TimelineRecorder` therefore records CUDA events on
each cell's stream through the hook's per-step context and turns them into
times on one axis (every device's events against a reference taken while the
devices were idle). Lane ``host`` is the caller's thread, in host time: the
loss between the pipeline's forward and backward, and whatever the caller
marks (the optimizer step).

matplotlib is optional (``pip install 'gpipe-bench[plot]'``): the PNG needs
it, the trace does not.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from gpipe_bench.atomic import write_atomically
from gpipe_bench.errors import HarnessError
from gpipe_bench.pipe.observe import Observer, StepRecord, observing

__all__ = [
    "PHASES",
    "Span",
    "Timeline",
    "TimelineRecorder",
    "check_writable",
    "paths",
    "row_path",
    "write",
    "write_chrome_trace",
    "write_png",
]

#: What a span did: a cell's forward, its recompute, its backward, a copy between devices,
#: or other work of the step (the loss, the optimizer) on the caller's thread.
PHASES = ("forward", "recompute", "backward", "copy", "other")


@dataclass(frozen=True)
class Span:
    """One piece of work: on ``lane``, micro-batch ``micro_batch`` of partition ``partition``."""

    lane: str  # 'cpu:0', 'cuda:1', 'link cuda:0->cuda:1', 'host', ...
    phase: str  # one of PHASES
    micro_batch: int  # -1 when the span is not a micro-batch's (the loss, the optimizer step)
    partition: int  # -1 when the span is not a partition's
    start: float  # seconds from the start of the step
    end: float
    label: str = ""  # what a span that is not a micro-batch's was ('loss', 'optimizer'); shown as its name

    @property
    def name(self) -> str:
        """The span's short name: phase initial and micro-batch (``F3``, ``R3``, ``B3``), else its label or phase."""
        if self.micro_batch >= 0:
            return f"{self.phase[:1].upper()}{self.micro_batch}"
        return self.label or self.phase

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    """The spans of one step, the lanes in display order, and what the step was."""

    title: str
    spans: List[Span]
    lanes: List[str] = field(default_factory=list)
    source: str = "measured"  # 'measured' or 'simulated'
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.lanes:
            self.lanes = list(dict.fromkeys(s.lane for s in self.spans))

    @property
    def duration(self) -> float:
        """From the earliest start to the latest end (0 for an empty timeline)."""
        if not self.spans:
            return 0.0
        return max(s.end for s in self.spans) - min(s.start for s in self.spans)

    def busy(self, lane: str) -> float:
        """Seconds ``lane`` was doing something (overlapping spans counted once)."""
        return _union([s for s in self.spans if s.lane == lane])

    def utilisation(self, lanes: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """Busy time / step duration per lane."""
        total = self.duration
        return {lane: (self.busy(lane) / total if total > 0 else 0.0) for lane in (lanes or self.lanes)}


def _union(spans: Sequence[Span]) -> float:
    busy, reach = 0.0, float("-inf")
    for s in sorted(spans, key=lambda s: s.start):
        if s.end <= reach:
            continue
        busy += s.end - max(s.start, reach)
        reach = s.end
    return busy


# -- writing -------------------------------------------------------------------------------------------------------

#: Colour of each phase in the PNG (the legend shows all five, always in this order).
_COLOURS = {
    "forward": "#3b6ea8",
    "recompute": "#f2b36b",
    "backward": "#5a9e5a",
    "copy": "#9a9a9a",
    "other": "#c44e52",
}
_DARK_TEXT = {"recompute", "copy"}  # light bars: black numbers; the others white


def paths(path: Path) -> Tuple[Path, Path]:
    """The PNG and the JSON that ``--timeline PATH`` names.

    ``PATH.png`` and ``PATH.json``; a ``PATH`` already ending in ``.png`` or
    ``.json`` gives its stem to both, and an existing directory holds
    ``timeline.png`` and ``timeline.json``.
    """
    base = _base(Path(path))
    return base.with_name(base.name + ".png"), base.with_name(base.name + ".json")


def row_path(path: Path, row: str) -> Path:
    """Where one of several rows' timelines goes: ``PATH-<row>`` (``t-pipeline-2.png``, ``t-pipeline-2.json``)."""
    base = _base(Path(path))
    return base.with_name(f"{base.name}-{row}")


def _base(path: Path) -> Path:
    if path.suffix.lower() in (".png", ".json"):
        return path.with_suffix("")
    if path.is_dir():
        return path / "timeline"
    return path


def _unwritable(path: Path, reason: str) -> HarnessError:
    return HarnessError(
        f"cannot write the timeline to '{path}': {reason}; give a path in a writable directory", param="--timeline"
    )


def check_writable(path: Path) -> None:
    """Fail before any training, not after it, when the files of ``--timeline PATH`` cannot be written.

    A missing directory is created (as ``--output`` does); one that cannot be,
    or cannot be written, or a target that is a directory, is a
    :class:`~gpipe_bench.errors.HarnessError`.
    """
    png, trace = paths(path)
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        for target in (png, trace):
            if target.is_dir():
                raise _unwritable(path, f"'{target}' is a directory")
        with tempfile.NamedTemporaryFile(dir=png.parent, prefix=".write-check-"):
            pass
    except OSError as error:
        raise _unwritable(path, error.strerror or type(error).__name__) from None


def write(timeline: Timeline, path: Path) -> List[Path]:
    """Write ``timeline`` as the PNG and the Chrome trace ``--timeline PATH`` names (:func:`paths`); both paths.

    The trace is written first: without matplotlib the PNG raises
    ModuleNotFoundError, and the trace is there all the same.
    """
    check_writable(path)
    png, trace = paths(path)
    write_chrome_trace(timeline, trace)
    write_png(timeline, png)
    return [png, trace]


def _atomic(path: Path, write_to: Any) -> Path:
    """Write ``path`` whole or not at all; a directory that cannot be written is the user's to fix."""
    try:
        return write_atomically(Path(path), write_to)
    except OSError as error:
        raise _unwritable(Path(path), error.strerror or type(error).__name__) from None


def _lanes(timeline: Timeline) -> List[str]:
    """The timeline's lanes in order, then any lane a span names that the list leaves out."""
    return list(dict.fromkeys([*timeline.lanes, *(s.lane for s in timeline.spans)]))


def write_chrome_trace(timeline: Timeline, path: Path) -> Path:
    """Write ``timeline`` in the Chrome trace event format (Perfetto, ``chrome://tracing``); return ``path``.

    One thread per lane, named and sorted in the timeline's order; one complete
    event (``ph: "X"``, ``ts`` and ``dur`` in microseconds) per span, named
    ``F3`` / ``R3`` / ``B3`` (phase initial, micro-batch) or by its label, with
    phase, micro-batch and partition in its ``args``.
    """
    lanes = _lanes(timeline)
    tid = {lane: k + 1 for k, lane in enumerate(lanes)}
    events: List[Dict[str, Any]] = [
        {
            "ph": "M",
            "name": "process_name",
            "pid": 1,
            "tid": 0,
            "args": {"name": f"{timeline.title} ({timeline.source})"},
        }
    ]
    for lane in lanes:
        events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid[lane], "args": {"name": lane}})
        events.append(
            {"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": tid[lane], "args": {"sort_index": tid[lane]}}
        )
    for s in sorted(timeline.spans, key=lambda s: (s.start, tid[s.lane])):
        args: Dict[str, Any] = {"phase": s.phase, "micro_batch": s.micro_batch, "partition": s.partition}
        if s.label:
            args["label"] = s.label
        events.append(
            {
                "ph": "X",
                "name": s.name,
                "cat": s.phase,
                "pid": 1,
                "tid": tid[s.lane],
                "ts": round(s.start * 1e6, 3),
                "dur": round(max(0.0, s.duration) * 1e6, 3),
                "args": args,
            }
        )
    document = {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "title": timeline.title,
            "source": timeline.source,
            "lanes": lanes,
            "duration_ms": round(timeline.duration * 1e3, 6),
            "utilisation": {lane: round(u, 6) for lane, u in timeline.utilisation(lanes).items()},
            "meta": timeline.meta,
        },
    }
    text = json.dumps(document, indent=1, default=str) + "\n"  # serialised first: a bad value never touches the disk
    return _atomic(path, lambda out: out.write(text.encode()))


def _figure_tools() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise ModuleNotFoundError("matplotlib is needed for timeline PNGs: pip install 'gpipe-bench[plot]'") from None
    return Figure, FigureCanvasAgg, Patch


def write_png(timeline: Timeline, path: Path) -> Path:
    """Draw ``timeline`` as a PNG, one lane per row top to bottom, a bar per span coloured by phase; return ``path``.

    The x axis is milliseconds from the start of the step; a bar wide enough
    shows its micro-batch (or its label); each lane says how busy it was.
    """
    Figure, FigureCanvasAgg, Patch = _figure_tools()
    lanes = _lanes(timeline)
    row = {lane: k for k, lane in enumerate(lanes)}
    height = 1.7 + 0.55 * max(1, len(lanes))
    figure = Figure(figsize=(11.0, height), dpi=120)
    canvas = FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    spans = [s for s in timeline.spans if s.end >= s.start]
    low = min([0.0, *(s.start * 1e3 for s in spans)])
    high = max([0.0, *(s.end * 1e3 for s in spans)])
    ax.set_xlim(low, high + 0.01 * (high - low) if high > low else 1.0)
    ax.set_ylim(len(lanes) - 0.5, -0.5)  # the first lane on top
    utilisation = timeline.utilisation(lanes)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([f"{lane}\n{utilisation[lane]:.0%} busy" for lane in lanes], fontsize=8)
    ax.set_xlabel("ms from the start of the step")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(f"{timeline.title} ({timeline.source})", fontsize=10)
    figure.legend(
        handles=[Patch(facecolor=colour, label=phase) for phase, colour in _COLOURS.items()],
        loc="lower center",
        ncol=len(_COLOURS),
        fontsize=8,
        frameon=False,
    )
    figure.tight_layout(rect=(0.0, 0.3 / height, 1.0, 1.0))  # room below for the legend
    # Bars drawn once the layout is fixed, so their widths in pixels are known: a span too short
    # to see is drawn 2 pixels wide (the trace keeps its true length), a number only where it fits.
    box = ax.get_window_extent(renderer=canvas.get_renderer())
    left, right = ax.get_xlim()
    pixels_per_ms = box.width / (right - left)
    for s in spans:
        colour = _COLOURS.get(s.phase, _COLOURS["other"])
        width = s.duration * 1e3
        ax.barh(
            row[s.lane],
            max(width, 2.0 / pixels_per_ms),
            left=s.start * 1e3,
            height=0.7,
            color=colour,
            edgecolor="white" if width * pixels_per_ms >= 4 else colour,
            linewidth=0.4,
        )
        text = str(s.micro_batch) if s.micro_batch >= 0 else s.label
        if text and width * pixels_per_ms >= 6.0 * len(text) + 4:
            ax.text(
                (s.start + s.end) / 2 * 1e3,
                row[s.lane],
                text,
                ha="center",
                va="center",
                fontsize=7,
                color="black" if s.phase in _DARK_TEXT else "white",
                clip_on=True,
            )
    return _atomic(path, lambda out: figure.savefig(out, format="png", dpi=120))


# -- recording -----------------------------------------------------------------------------------------------------


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
