"""Writing a :class:`~gpipe_bench.timeline.model.Timeline`: a Chrome trace JSON and a PNG, and where they go.

Why one writer for both kinds of step: a measured step
(:mod:`gpipe_bench.timeline.recorder`) and a simulated one
(:mod:`gpipe_bench.predict.simulate`) are only comparable if they are drawn
the same way, so both are written by these functions: a Chrome trace JSON that
Perfetto and ``chrome://tracing`` open, and a PNG with one lane per device.
``--timeline PATH`` names both files (:func:`paths`), and
:func:`check_writable` refuses a path that cannot be written before any
training.

matplotlib is optional (``pip install 'gpipe-bench[plot]'``): the PNG needs
it, the trace does not.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

from gpipe_bench.atomic import write_atomically
from gpipe_bench.errors import HarnessError
from gpipe_bench.timeline.model import Timeline

__all__ = ["check_writable", "paths", "row_path", "write", "write_chrome_trace", "write_png"]

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

    A missing directory is created (as ``--results`` does); one that cannot be,
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
