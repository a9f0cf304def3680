"""Ours against the published figures, row by row: typed rows, flags, the regressions ``compare --check`` fails on.

Speed rows compare speedups (absolute throughput depends on the card) and
show measured / ideal pipeline speedup by the performance model
(:mod:`gpipe_bench.perf`); memory and accuracy rows compare their figures.
A run with settings of its own (:attr:`gpipe_bench.results.Result.overrides`)
is shown after its row, labelled with what differs, and is never compared with
the published row: those figures are of other settings.

Only the published profile is compared row by row. Another profile's table
says once why not (:mod:`.comparable`) and shows what carries over: speedups
each over the ideal of its own settings, the gap between pipeline and
data-parallel errors, ours and the published side by side. Predictions
(``memory --predict-only`` records of older versions) are not measurements:
they are named, never compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Literal, Optional, Sequence

from gpipe_bench import perf
from gpipe_bench.results import DEFAULT_ENGINE, Result, settings_label

from .audit import count_interval, published_inconsistencies
from .comparable import published_row, why_not
from .format import DASH, as_float, fmt_num, format_gib, join_blocks, published_value, render_grid, seed_stats
from .groups import Group, for_groups, group_heading, ideal_speedup_of, on_row_devices, row_label, row_slots, speedup_of
from .tables import transparency, transparency_outside

if TYPE_CHECKING:  # config imports models; rendering needs only the attributes
    from gpipe_bench.config import Profile, Row, Table
    from gpipe_bench.predict.run import PredictedSpeedups


#: A row's verdict: within tolerance, worse, better, not measured, or not compared (another profile than the
#: published one, a run with settings of its own).
Flag = Literal["ok", "regression", "better", "missing", "not compared"]


@dataclass
class CompareRow:
    """One row of one engine on one machine and profile, against its published figures."""

    experiment: str
    engine: str
    profile: str
    hardware: Optional[str]
    status: Optional[str]  # the record's status; None when there is no record
    ours: Optional[float]  # our figure
    published: Optional[float]
    micro_batches: Optional[int]  # pipeline rows: what the chunks really give
    ideal: Optional[float]  # the ideal speedup of the settings our record ran (perf.ideal_speedup)
    speedup: Optional[float] = None
    published_speedup: Optional[float] = None
    ratio: Optional[float] = None  # ours / published (speedups for speed rows)
    of_ideal: Optional[float] = None
    #: the ideal speedup of the published row's settings: what the published speedup is divided by
    published_ideal: Optional[float] = None
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
    table: "Table",
    profile: "Profile",
    group: Group,
    row: "Row",
    engine: str,
    result: Optional[Result],
    reason: Optional[str] = None,
) -> CompareRow:
    """``reason``: why the group's profile is not compared with the published figures (None: it is)."""
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
        if ideal is not None and entry.speedup is not None:
            entry.of_ideal = entry.speedup / ideal
        their_row = published_row(table, row.name) if own else None
        entry.published_ideal = ideal_speedup_of(their_row) if their_row is not None else None
        if entry.published_ideal is not None and entry.published_speedup is not None:
            entry.published_of_ideal = entry.published_speedup / entry.published_ideal
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
    elif result.status != "ok" or result.value is None:
        entry.flag, entry.note = "missing", f"run {result.status}"
    elif reason is not None:
        entry.flag, entry.note = "not compared", reason
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
    if reason is not None and entry.flag in ("ok", "regression", "better"):
        # Another profile's rows never regress against the published figures, whatever they are (an out of memory).
        entry.flag, entry.note, extra_note = "not compared", reason, ""
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
    compared: List[CompareRow] = []  # of the groups compared row by row: the rows the flags list

    def block(profile: "Profile", group: Group) -> str:
        reason = why_not(table, profile)
        group_entries = [
            _compare_row(table, profile, group, row, engine, result, reason)
            for row, engine, result in row_slots(profile, group)
        ]
        entries.extend(group_entries)
        if reason is None:
            compared.extend(group_entries)
            return f"{group_heading(table, group)}\n\n{_compare_grid(table, group_entries, fmt)}"
        grid = _shape_grid(table, profile, group, group_entries, fmt)
        return f"{group_heading(table, group)}\n\n{grid}\n\nNot compared row by row: {reason}."

    mine = [r for r in results if r.table == table.name]
    predictions = sorted({f"{r.experiment} ({r.profile} profile)" for r in mine if r.status == "predicted"})
    measured = [r for r in mine if r.status != "predicted"]
    blocks = for_groups(table, measured, block)

    regressions = [_describe(table, e) for e in entries if e.flag == "regression"]
    if predicted is not None:
        text, missed = _predicted_block(table, predicted, fmt)
        blocks.append(text)
        if predicted.checked:
            regressions += missed
    if table.kind == "accuracy":  # a pipeline row that learns something else than data parallelism regresses
        regressions += transparency_outside(table, measured)
    inconsistencies = published_inconsistencies(table)
    flagged = [_describe(table, e) for e in compared if e.flag not in ("ok", "not compared")]
    apart: List[str] = []
    own_settings = sorted({e.label for e in entries if e.overrides})
    if own_settings:
        apart.append(f"runs with settings of their own (not their rows'): {', '.join(own_settings)}")
    if predictions:
        apart.append(f"predictions, not measurements (memory --predict-only): {', '.join(predictions)}")
    blocks.append(
        "Flags:\n"
        + (
            "\n".join(f"- {line}" for line in flagged)
            if flagged
            else f"- none: every row compared is within ±{table.tolerance:.0%} of the published figure"
            if any(e.flag == "ok" for e in compared)
            else "- none: no row compared with the published figures"
        )
        + "".join(f"\n- not compared: {line}" for line in apart)
    )
    if table.kind == "accuracy":
        spread = transparency(table, measured)
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
        cells = [e.label, fmt_num(e.ours, digits) if e.status in (None, "ok") else str(e.status)]
        cells.append(fmt_num(e.published, digits))
        if speed:
            cells += [
                _spread(e),
                fmt_num(e.speedup, 3, "x"),
                fmt_num(e.published_speedup, 3, "x"),
                fmt_num(e.ratio, 3),
                _of_ideal(e.of_ideal, e.ideal),
                _of_ideal(e.published_of_ideal, e.published_ideal),
            ]
        else:
            cells += [fmt_num(e.ratio, 3)]
        cells.append(e.flag)
        rows.append(cells)
    return render_grid(headers, rows, ["left"] + ["right"] * (len(headers) - 2) + ["left"], fmt)


def _spread(e: CompareRow) -> str:
    return DASH if e.spread is None else f"±{100 * e.spread:.1f}%"


def _of_ideal(of_ideal: Optional[float], ideal: Optional[float]) -> str:
    """``0.56 of 1.20x``: a speedup over the ideal of the settings it was measured with (each its own)."""
    return DASH if of_ideal is None or ideal is None else f"{of_ideal:.2f} of {ideal:.2f}x"


def _shape_grid(table: "Table", profile: "Profile", group: Group, entries: Sequence[CompareRow], fmt: str) -> str:
    """A profile not compared row by row: ours beside the published, each over its own setup, no ratio, no flag.

    Speed: the speedups over the ideal of each one's own settings (the shape of the
    curve carries over, the figures do not). Accuracy: each pipeline row's error
    minus the data-parallel row's of its batch, ours and the published. Memory:
    ours and our prediction of it.
    """
    digits = 3 if table.kind == "speed" else 2
    rows: List[List[str]] = []
    if table.kind == "speed":
        headers = ["Experiment", "Ours", "Spread", "Speedup", "Measured / ideal"]
        headers += ["Published speedup", "Published / ideal"]
        for e in entries:
            ours = fmt_num(e.ours, digits) if e.status in (None, "ok") else str(e.status)
            rows.append(
                [e.label, ours, _spread(e), fmt_num(e.speedup, 3, "x"), _of_ideal(e.of_ideal, e.ideal)]
                + [fmt_num(e.published_speedup, 3, "x"), _of_ideal(e.published_of_ideal, e.published_ideal)]
            )
    elif table.kind == "accuracy":
        headers = ["Experiment", "Ours", "Ours - data-parallel", "Published", "Published - data-parallel"]
        gaps = _transparency_gaps(profile, group)
        for e in entries:
            ours = fmt_num(e.ours, digits) if e.status in (None, "ok") else str(e.status)
            mine, theirs = gaps.get(e.label, (None, None))
            rows.append([e.label, ours, _points(mine), fmt_num(e.published, 2), _points(theirs)])
    else:
        headers = ["Experiment", "Ours", "Predicted", "Predicted / measured"]
        for e, (_, _, result) in zip(entries, row_slots(profile, group)):
            extra = result.extra if result is not None else {}
            ours = format_gib(e.ours) if e.status in (None, "ok") else str(e.status)
            predicted = extra.get("predicted_gib")
            ratio = extra.get("predicted_over_measured")
            if ratio is None and e.ours and predicted is not None and e.status in (None, "ok"):
                ratio = predicted / e.ours  # records made before the ratio was recorded: the same division
            rows.append([e.label, ours, format_gib(predicted), fmt_num(ratio, 3)])
    return render_grid(headers, rows, ["left"] + ["right"] * (len(headers) - 1), fmt)


def _points(gap: Optional[float]) -> str:
    return DASH if gap is None else f"{gap:+.2f} points"


def _transparency_gaps(profile: "Profile", group: Group) -> "dict[str, tuple[Optional[float], Optional[float]]]":
    """Per pipeline row (its own record): its mean error minus the data-parallel row's of its batch, ours and
    the published; a signed gap either way is what pipelining changes about learning, at any size."""
    gaps = {}
    for row in profile.rows:
        peer = next((r for r in profile.rows if r.mode == "dataparallel" and r.batch == row.batch), None)
        if row.mode != "pipeline" or peer is None:
            continue
        ours, base = group.get(row.name, DEFAULT_ENGINE), group.get(peer.name, DEFAULT_ENGINE)
        mine = None
        if ours is not None and base is not None and ours.samples and base.samples:
            mine = seed_stats(ours)[0] - seed_stats(base)[0]
        theirs = [as_float(r.published.values.get("top1_error")) for r in (row, peer)]
        published = theirs[0] - theirs[1] if theirs[0] is not None and theirs[1] is not None else None
        gaps[row.name] = (mine, published)
    return gaps


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
