"""Plots of saved results as PNGs: per-device memory (memory tables), error per epoch (accuracy tables).

Why a picture: balancing is about the largest device, and eight numbers per
row are easier to compare by eye. Each bar stacks the device's model memory
(hatched) under its peak activation memory (measured: solid; predicted only:
outlined), and a black tick marks model + predicted activation on every
device, so prediction and measurement can be told apart at a glance.

matplotlib is optional (``pip install 'gpipe-bench[plot]'``); it is imported
here only, and drawn with the Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Sequence, Set

from .atomic import write_atomically
from .results import Result, settings_label, summarize

if TYPE_CHECKING:
    from .config import Table

__all__ = ["memory_plot", "accuracy_plot"]

_MODEL, _MEASURED, _PREDICTED = "#c9d6e8", "#3b6ea8", "#f2b36b"


def _figure_tools() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise ModuleNotFoundError("matplotlib is needed for plots: pip install 'gpipe-bench[plot]'") from None
    return Figure, FigureCanvasAgg, Patch


def _ordered(table: "Table", results: Sequence[Result]) -> List[Result]:
    mine = [r for r in results if r.table == table.name]
    profile = table.profiles.get(mine[0].profile) if mine else None
    if profile is None:
        return mine
    order = {row.name: k for k, row in enumerate(profile.rows)}
    return sorted(mine, key=lambda r: (order.get(r.experiment, len(order)), r.engine))


def _name(result: Result) -> str:
    """The row's name, and the settings it changed where it ran with settings of its own (as the tables say)."""
    return f"{result.experiment} [{settings_label(result.overrides)}]" if result.overrides else result.experiment


def _values(result: Result, key: str, count: int) -> List[float]:
    values = [float(v) for v in (result.extra.get(key) or [])]
    return values + [0.0] * (count - len(values)) if values else []


def memory_plot(table: "Table", results: Sequence[Result], path: Path) -> Path:
    """Write a PNG of per-device memory, one group of bars per row, and return its path."""
    rows = _ordered(table, results)
    if not rows:
        raise ValueError(f"no {table.name} results to plot")
    Figure, FigureCanvasAgg, Patch = _figure_tools()

    peak = 0.0
    for r in rows:
        model = _values(r, "model_memory_per_device_gib", len(r.extra.get("devices") or []))
        for key in ("measured_per_device_gib", "predicted_per_device_gib"):
            for m, v in zip(model or [0.0] * 64, _values(r, key, len(model))):
                peak = max(peak, m + v)
    scale, unit = (1.0, "GiB") if peak >= 1 else (1024.0, "MiB")

    bars = sum(max(1, len(r.extra.get("devices") or [])) for r in rows)
    figure = Figure(figsize=(max(7.0, 1.2 + 0.45 * (bars + len(rows))), 4.8))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    x, ticks, labels = 0.0, [], []
    drawn: Set[str] = set()  # legend entries for what the figure actually shows
    for r in rows:
        devices = list(r.extra.get("devices") or [])
        n = max(1, len(devices))
        model = _values(r, "model_memory_per_device_gib", n) or [0.0] * n
        measured = _values(r, "measured_per_device_gib", n)
        predicted = _values(r, "predicted_per_device_gib", n)
        xs = [x + k for k in range(n)]
        ax.bar(xs, [m * scale for m in model], width=0.8, color=_MODEL, hatch="//", edgecolor="#7f8fa6", linewidth=0.5)
        drawn.add("model")
        if measured:
            ax.bar(xs, [v * scale for v in measured], width=0.8, bottom=[m * scale for m in model], color=_MEASURED)
            drawn.add("measured")
        elif predicted:
            drawn.add("predicted")
            ax.bar(
                xs,
                [v * scale for v in predicted],
                width=0.8,
                bottom=[m * scale for m in model],
                color=_PREDICTED,
                alpha=0.45,
                edgecolor=_PREDICTED,
                linestyle="--",
                linewidth=1.2,
            )
        if predicted:
            tops = [(m + v) * scale for m, v in zip(model, predicted)]
            ax.hlines(tops, [p - 0.4 for p in xs], [p + 0.4 for p in xs], colors="black", linewidth=1.6)
            drawn.add("tick")
        if r.status == "oom":
            top = max((m + v) * scale for m, v in zip(model, predicted or [0.0] * n))
            ax.annotate(
                "Out of memory",
                (x + (n - 1) / 2, top),
                xytext=(0, 6),
                textcoords="offset points",
                ha="center",
                color="#b03030",
                fontsize=8,
            )
        ticks.append(x + (n - 1) / 2)
        engine = "" if r.engine == "gpipe-bench" else f" ({r.engine})"
        labels.append(f"{_name(r)}{engine}\n{n} device{'s' if n > 1 else ''}")
        x += n + 1
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(f"{unit} per device")
    ax.set_ylim(0, peak * scale * 1.15 if peak > 0 else 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    entries = {
        "model": Patch(
            facecolor=_MODEL, hatch="//", edgecolor="#7f8fa6", label="model memory (weights, grads, optimizer)"
        ),
        "measured": Patch(facecolor=_MEASURED, label="peak activation, measured"),
        "predicted": Patch(
            facecolor=_PREDICTED,
            alpha=0.45,
            edgecolor=_PREDICTED,
            linestyle="--",
            label="peak activation, predicted only",
        ),
        "tick": Patch(facecolor="black", label="model + predicted activation"),
    }
    # Below the axes: inside, it would hide the bars whenever the rows are of similar height.
    ax.legend(
        handles=[patch for name, patch in entries.items() if name in drawn],
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=len(drawn),
        frameon=False,
    )
    ax.set_title(f"{table.title}: per-device memory ({rows[0].profile} profile, {rows[0].hardware_key()})", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: Any, path: Path) -> Path:
    return write_atomically(path, lambda out: figure.savefig(out, format="png", dpi=120))


def accuracy_plot(table: "Table", results: Sequence[Result], path: Path) -> Path:
    """Validation error per row as a PNG: each seed's final error beside the row's mean ± one std and,
    when the rows ran more than one epoch, the error per epoch (mean over seeds, a band of ± one std).

    One colour per batch, data-parallel rows solid (circles), pipeline rows dashed
    (squares), so "pipelining learns what data parallelism learns" is a matter of
    marks of one colour overlapping. A one-epoch run (the quick profile) has no
    curve to draw: its seeds are the picture.
    """
    rows = [r for r in _ordered(table, results) if r.extra.get("curves")]
    if not rows:
        raise ValueError(f"no {table.name} results with per-epoch curves to plot")
    curves_of = {_name(r): [list(map(float, c)) for c in r.extra["curves"].values() if c] for r in rows}
    epochs = max(min(len(c) for c in curves) for curves in curves_of.values())
    Figure, FigureCanvasAgg, _ = _figure_tools()
    figure = Figure(figsize=(10.5 if epochs > 1 else 7.0, 4.8))
    FigureCanvasAgg(figure)
    palette = ["#3b6ea8", "#d0743c", "#5a9e5a", "#8c5fa8", "#b8a03c", "#c44e52"]
    batches = sorted({int(r.settings.get("batch", 0)) for r in rows})  # one colour per batch: DP and pipeline pair up

    def colour(r: Result) -> str:
        return palette[batches.index(int(r.settings.get("batch", 0))) % len(palette)]

    def stats(values: Sequence[float]) -> "tuple[float, float]":
        return math.fsum(values) / len(values), summarize(values)["std"]

    if epochs > 1:
        ax = figure.add_subplot(1, 2, 1)
        for r in rows:
            curves = curves_of[_name(r)]
            n = min(len(c) for c in curves)
            xs = list(range(1, n + 1))
            means, stds = zip(*(stats([c[e] for c in curves]) for e in range(n)))
            style = "--" if r.settings.get("mode") == "pipeline" else "-"
            ax.plot(xs, means, style, color=colour(r), marker="o", markersize=3, label=f"{_name(r)} (n={len(curves)})")
            lows, highs = [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)]
            ax.fill_between(xs, lows, highs, color=colour(r), alpha=0.15, linewidth=0)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("validation top-1 error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("per epoch", fontsize=9)
    ax = figure.add_subplot(1, 2, 2) if epochs > 1 else figure.add_subplot(1, 1, 1)
    for k, r in enumerate(rows):
        finals = [c[-1] for c in curves_of[_name(r)]]
        mean, std = stats(finals)
        pipeline = r.settings.get("mode") == "pipeline"
        offsets = [(j - (len(finals) - 1) / 2) * 0.08 for j in range(len(finals))]
        ax.scatter([k + o for o in offsets], finals, color=colour(r), marker="s" if pipeline else "o", s=22, zorder=3)
        ax.errorbar(
            [k + 0.3], [mean], yerr=[std], color=colour(r), capsize=3, marker="_", markersize=14, linestyle="none"
        )
        ax.annotate(f"{mean:.2f}±{std:.2f}", (k + 0.36, mean), fontsize=7, va="center")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{_name(r)}\n(batch {r.settings.get('batch', '?')})" for r in rows], fontsize=7)
    ax.set_xlim(-0.5, len(rows) - 0.2)
    ax.set_ylabel("validation top-1 error (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title("after the last epoch: each seed, mean ± std", fontsize=9)
    figure.suptitle(
        f"{table.title}: validation error ({rows[0].profile} profile, {rows[0].hardware_key()}, "
        f"{epochs} epoch{'s' if epochs > 1 else ''})",
        fontsize=9,
    )
    figure.tight_layout()
    return _save(figure, path)
