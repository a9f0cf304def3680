"""Ours against the published figures, row by row: typed rows, flags, the regressions ``compare --check`` fails on.

Speed rows compare speedups (absolute throughput depends on the card) and
show measured / ideal pipeline speedup by the performance model
(:mod:`gpipe_bench.perf`); memory and accuracy rows compare their figures.
A run with settings of its own (:attr:`gpipe_bench.results.Result.overrides`)
is shown after its row, labelled with what differs, and is never compared with
the published row: those figures are of other settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Literal, Optional, Sequence

from gpipe_bench import perf
from gpipe_bench.results import Result, settings_label

from .audit import count_interval, published_inconsistencies
from .format import DASH, as_float, fmt_num, join_blocks, published_value, render_grid
from .groups import Group, for_groups, group_heading, ideal_speedup_of, on_row_devices, row_label, row_slots, speedup_of
from .tables import transparency, transparency_outside

if TYPE_CHECKING:  # config imports models; rendering needs only the attributes
    from gpipe_bench.config import Profile, Row, Table
    from gpipe_bench.predict.run import PredictedSpeedups


#: A row's verdict: within tolerance, worse, better, not comparable (quick profile, prediction), not measured,
#: or not compared at all (a run with settings of its own).
Flag = Literal["ok", "regression", "better", "differs", "missing", "not compared"]


@dataclass
class CompareRow:
    """One row of one engine on one machine and profile, against its published figures."""

    experiment: str
    engine: str
    profile: str
    hardware: Optional[str]
    status: Optional[str]  # the record's status; None when there is no record
    ours: Optional[float]  # our figure (a prediction for predicted-only memory rows)
    published: Optional[float]
    micro_batches: Optional[int]  # pipeline rows: what the chunks really give
    ideal: Optional[float]  # the ideal speedup on the row's devices (perf.ideal_speedup)
    speedup: Optional[float] = None
    published_speedup: Optional[float] = None
    ratio: Optional[float] = None  # ours / published (speedups for speed rows)
    of_ideal: Optional[float] = None
    published_of_ideal: Optional[float] = None
    spread: Optional[float] = None  # relative std of the per-epoch figures
    flag: Flag = "ok"
    note: str = ""
    #: What the run changed of its row's settings (:func:`gpipe_bench.results.settings_label`); "" for the row's own
    overrides: str = ""

    @property
    def label(self) -> str:
        """The row's name, the engine's where not ours, and the settings it changed."""
        label = row_label(self.experiment, self.engine)
        return f"{label} [{self.overrides}]" if self.overrides else label


@dataclass
class Comparison:
    """Ours against the published figures: a typed row per row, the regressions, slips in the published data, text."""

    rows: List[CompareRow]
    regressions: List[str]
    inconsistencies: List[str]
    text: str


def _flag(table: "Table", ratio: float) -> Flag:
    tol = table.tolerance
    if ratio < 1 - tol:
        return "regression" if table.higher_is_better else "better"
    if ratio > 1 + tol:
        return "better" if table.higher_is_better else "regression"
    return "ok"


def _compare_row(
    table: "Table", profile: "Profile", group: Group, row: "Row", engine: str, result: Optional[Result]
) -> CompareRow:
    own = result is None or not result.overrides
    values = row.published.values if own else {}
    speed = table.kind == "speed"
    ideal = ideal_speedup_of(row, result) if on_row_devices(row, result) else None
    entry = CompareRow(
        experiment=row.name,
        engine=engine,
        profile=group.profile,
        hardware=group.hardware,
        status=result.status if result is not None else None,
        ours=result.value if result is not None and result.status == "ok" else None,
        published=published_value(table, row) if own else None,
        micro_batches=_micro_batches(row, result),
        ideal=ideal,
        overrides=settings_label(result.overrides) if result is not None else "",
    )
    if speed:
        entry.published_speedup = as_float(values.get("speedup"))
        entry.speedup = speedup_of(table, profile, group, result)
        if ideal is not None:
            if entry.speedup is not None:
                entry.of_ideal = entry.speedup / ideal
            if entry.published_speedup is not None:
                entry.published_of_ideal = entry.published_speedup / ideal
    if result is not None and result.value and result.spread.get("std") is not None:
        entry.spread = result.spread["std"] / result.value
    extra_note = _parameter_note(table, row, result) if own else ""

    if result is None:
        entry.flag, entry.note = "missing", "no result"
    elif not own:
        entry.flag = "not compared"
        entry.note = f"ran with {entry.overrides}, not its row's settings: not compared with the published figures"
    elif result.status == "oom":
        nothing_published = entry.published is None or str(values.get("status", "")).lower() == "out of memory"
        entry.flag = "ok" if nothing_published else "regression"
        entry.note = "out of memory, as published" if nothing_published else "out of memory"
    elif result.status == "predicted" and as_float(result.extra.get("predicted_gib")) is not None:
        # A prediction is not a measurement: it is shown against the published figure, never a regression.
        predicted = float(result.extra["predicted_gib"])
        theirs = entry.published
        entry.ours = predicted
        if theirs:
            entry.ratio = predicted / theirs
            entry.flag = "ok" if _flag(table, entry.ratio) == "ok" else "differs"
            entry.note = (
                f"predicted (not measured) {predicted:.2f} {table.unit} vs published {theirs:.2f} "
                f"{table.unit} (ratio {entry.ratio:.3f})"
            )
        else:
            entry.note = f"predicted (not measured) {predicted:.2f} {table.unit}; nothing published to compare"
    elif result.status != "ok" or result.value is None:
        entry.flag, entry.note = "missing", f"run {result.status}"
    else:
        ours, theirs = (entry.speedup, entry.published_speedup) if speed else (entry.ours, entry.published)
        if ours is None and speed:
            entry.flag, entry.note = "missing", f"no result for the baseline {table.baseline} on this hardware"
        elif theirs is None or ours is None or theirs == 0:
            entry.flag, entry.note = "ok", "nothing published to compare"
        else:
            entry.ratio = ours / theirs
            entry.flag = _flag(table, entry.ratio)
            what = "speedup" if speed else table.metric
            digits = 3 if speed else 2
            unit = "x" if speed else f" {table.unit}"
            entry.note = (
                f"{what} {ours:.{digits}f}{unit} vs published {theirs:.{digits}f}{unit} "
                f"(ratio {entry.ratio:.3f}, tolerance ±{table.tolerance:.0%})"
            )
    if group.profile != "published" and entry.flag in ("regression", "better"):
        # Scaled-down rows on other hardware cannot regress against the published figures:
        # report the difference, never fail `compare --check` on it.
        entry.flag = "differs"
        entry.note += f" ({group.profile} profile: not comparable with the published hardware)"
    if extra_note:
        entry.note = f"{entry.note}; {extra_note}" if entry.note else extra_note
    return entry


def _micro_batches(row: "Row", result: Optional[Result]) -> Optional[int]:
    """A pipeline row's micro-batches as ``result`` ran them (its recorded batch and chunks)."""
    if row.mode != "pipeline":
        return None
    ran = result.settings if result is not None else {}
    return perf.effective_microbatches(int(ran.get("batch", row.batch)), int(ran.get("chunks", row.chunks)))


def _parameter_note(table: "Table", row: "Row", result: Optional[Result]) -> str:
    """Our parameter count and model memory against the published ones (memory tables)."""
    if table.kind != "memory" or result is None:
        return ""
    notes = []
    ours, interval = result.extra.get("parameters"), count_interval(row.published.values.get("parameters"))
    if isinstance(ours, int) and interval is not None and not interval[0] <= ours <= interval[2]:
        notes.append(f"our model has {ours:,} parameters, published {row.published.values.get('parameters')}")
    memory, published = (
        as_float(result.extra.get("model_memory_gib")),
        as_float(row.published.values.get("model_memory_gb")),
    )
    if memory is not None and published is not None and abs(memory - published) > 0.005 + 1e-9:
        notes.append(f"model memory {memory:.2f} GiB by the column's rule, published {published:.2f}GB")
    return "; ".join(notes)


def _describe(table: "Table", entry: CompareRow) -> str:
    line = f"{table.name} {entry.label} [{entry.flag}]"
    if entry.hardware is not None:
        line += f" on {entry.hardware} ({entry.profile} profile)"
    return f"{line}: {entry.note}"


def compare(
    table: "Table", results: Sequence[Result], *, fmt: str = "rst", predicted: Optional["PredictedSpeedups"] = None
) -> Comparison:
    """Row by row against the published figures; see the module docstring. ``predicted``: a block of its own."""
    entries: List[CompareRow] = []

    def block(profile: "Profile", group: Group) -> str:
        group_entries = [
            _compare_row(table, profile, group, row, engine, result)
            for row, engine, result in row_slots(profile, group)
        ]
        entries.extend(group_entries)
        return f"{group_heading(table, group)}\n\n{_compare_grid(table, group_entries, fmt)}"

    blocks = for_groups(table, results, block)

    regressions = [_describe(table, e) for e in entries if e.flag == "regression"]
    if predicted is not None:
        text, missed = _predicted_block(table, predicted, fmt)
        blocks.append(text)
        if predicted.checked:
            regressions += missed
    if table.kind == "accuracy":  # a pipeline row that learns something else than data parallelism regresses
        regressions += transparency_outside(table, results)
    inconsistencies = published_inconsistencies(table)
    flagged = [_describe(table, e) for e in entries if e.flag != "ok"]
    blocks.append(
        "Flags:\n"
        + (
            "\n".join(f"- {line}" for line in flagged)
            if flagged
            else f"- none: every row within ±{table.tolerance:.0%} of the published figure"
        )
    )
    if table.kind == "accuracy":
        spread = transparency(table, results)
        blocks.append(
            "Transparency (pipeline vs data-parallel):\n"
            + ("\n".join(f"- {line}" for line in spread) if spread else "- nothing measured to compare")
        )
    blocks.append(
        "Published data:\n"
        + ("\n".join(f"- {line}" for line in inconsistencies) if inconsistencies else "- consistent")
    )
    return Comparison(rows=entries, regressions=regressions, inconsistencies=inconsistencies, text=join_blocks(blocks))


def _compare_grid(table: "Table", entries: Sequence[CompareRow], fmt: str) -> str:
    speed = table.kind == "speed"
    digits = 3 if speed else 2
    headers = ["Experiment", "Ours", "Published"]
    if speed:
        headers += ["Spread", "Speedup", "Published speedup", "Ratio", "Measured / ideal", "Published / ideal"]
    else:
        headers += ["Ratio"]
    headers += ["Flag"]
    rows = []
    for e in entries:
        cells = [
            e.label,
            fmt_num(e.ours, digits)
            if e.status in (None, "ok")
            else f"{fmt_num(e.ours, digits)} (predicted)"
            if e.status == "predicted"
            else str(e.status),
            fmt_num(e.published, digits),
        ]
        if speed:
            ideal = e.ideal
            cells += [
                DASH if e.spread is None else f"±{100 * e.spread:.1f}%",
                fmt_num(e.speedup, 3, "x"),
                fmt_num(e.published_speedup, 3, "x"),
                fmt_num(e.ratio, 3),
                DASH if ideal is None or e.of_ideal is None else f"{e.of_ideal:.2f} of {ideal:.2f}x",
                DASH
                if ideal is None or e.published_of_ideal is None
                else f"{e.published_of_ideal:.2f} of {ideal:.2f}x",
            ]
        else:
            cells += [fmt_num(e.ratio, 3)]
        cells.append(e.flag)
        rows.append(cells)
    return render_grid(headers, rows, ["left"] + ["right"] * (len(headers) - 2) + ["left"], fmt)


def _predicted_block(table: "Table", predicted: "PredictedSpeedups", fmt: str) -> "tuple[str, List[str]]":
    """The predicted speedups beside the published ones, and the rows outside the table's tolerance."""
    rows, missed = [], []
    for row in table.profile("published").rows:
        ours = predicted.speedups.get(row.name)
        theirs = as_float(row.published.values.get("speedup"))
        ratio = ours / theirs if ours is not None and theirs else None
        flag = DASH
        if ratio is not None:
            flag = "ok" if abs(ratio - 1) <= table.tolerance else "off"
            if flag == "off":
                missed.append(
                    f"{table.name} {row.name} [predicted]: {ours:.3f}x on {predicted.hardware} is {ratio - 1:+.1%} "
                    f"from the published {theirs:.3f}x (tolerance ±{table.tolerance:.0%})"
                )
        rows.append([row.name, fmt_num(ours, 3, "x"), fmt_num(theirs, 3, "x"), fmt_num(ratio, 3), flag])
    headers = ["Experiment", "Predicted speedup", "Published speedup", "Ratio", "Within tolerance"]
    grid = render_grid(headers, rows, ["left", "right", "right", "right", "left"], fmt)
    checked = "checked by compare --check" if predicted.checked else "shown, not checked"
    return f"Predicted on {predicted.hardware} ({predicted.costs}; {checked}):\n\n{grid}", missed
