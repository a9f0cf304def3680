"""Saved results grouped by profile and machine, and what a row's figures mean within its group.

Speedups are only ever taken between results of the same table, profile,
hardware, precision and engine: a ratio of figures from two machines (or of a
bf16 row over an fp32 baseline) means nothing. When
one row was measured twice, the newer record counts (by time, not by its
text: records from other time zones compare correctly).

A run with settings of its own (:attr:`gpipe_bench.results.Result.overrides`)
is not its row's record: it is kept apart (:attr:`Group.variants`), shown
after its row under a label naming what differs (:func:`row_label`), and its
ideal speedup is its own settings' (:func:`ideal_speedup_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from gpipe_bench import perf
from gpipe_bench.precision import DEFAULT as DEFAULT_PRECISION
from gpipe_bench.results import DEFAULT_ENGINE, Result, created_at, settings_label, settings_tag

from .format import DASH, join_blocks, render_grid

if TYPE_CHECKING:  # config imports models; rendering needs only the attributes
    from gpipe_bench.config import Profile, Row, Table


def ideal_speedup_of(row: "Row", result: Optional[Result] = None) -> Optional[float]:
    """The ideal speedup of ``row`` as ``result`` ran it (its recorded settings), else as the config has it.

    A ratio over an ideal is only meaningful when both belong to one configuration:
    a record's settings are what it ran, whatever the config says today.
    """
    ran: Dict[str, Any] = result.settings if result is not None else {}
    balance = ran.get("balance")
    devices = len(balance) if isinstance(balance, list) and row.mode == "pipeline" else row.devices
    return perf.ideal_speedup(
        str(ran.get("mode", row.mode)),
        devices,
        int(ran.get("batch", row.batch)),
        int(ran.get("chunks", row.chunks)),
        str(ran.get("checkpoint", row.checkpoint)),
    )


@dataclass
class Group:
    """The results of one table measured under one profile on one machine in one precision."""

    profile: str
    hardware: Optional[str]  # None: no results at all
    precision: str = DEFAULT_PRECISION
    results: Dict[Tuple[str, str], Result] = field(default_factory=dict)  # (experiment, engine) -> newest
    #: Runs with settings of their own: (experiment, engine, settings tag) -> newest; never a row's record.
    variants: Dict[Tuple[str, str, str], Result] = field(default_factory=dict)

    def engines(self) -> List[str]:
        engines = {engine for _, engine in self.results} | {engine for _, engine, _ in self.variants}
        return [DEFAULT_ENGINE] + sorted(engines - {DEFAULT_ENGINE})

    def get(self, experiment: str, engine: str) -> Optional[Result]:
        """The row's own record (its config's settings) by ``engine``; never a run with settings of its own."""
        return self.results.get((experiment, engine))

    def variants_of(self, experiment: str, engine: str) -> List[Result]:
        """The runs of the row by ``engine`` with settings of their own, by their settings tag."""
        return [self.variants[k] for k in sorted(self.variants) if k[:2] == (experiment, engine)]

    def all(self) -> List[Result]:
        """Every record of the group: the rows' own and the runs with settings of their own."""
        return list(self.results.values()) + list(self.variants.values())


def group_results(table: "Table", results: Sequence[Result]) -> List[Group]:
    groups: Dict[Tuple[str, str, str], Group] = {}
    for result in results:
        if result.table != table.name:
            continue
        key = (result.profile, result.hardware_key(), result.precision)
        group = groups.setdefault(key, Group(*key))
        if result.overrides:
            variant = (result.experiment, result.engine, settings_tag(result.overrides))
            if variant not in group.variants or created_at(group.variants[variant]) <= created_at(result):
                group.variants[variant] = result
            continue
        slot = (result.experiment, result.engine)
        if slot not in group.results or created_at(group.results[slot]) <= created_at(result):
            group.results[slot] = result
    if not groups:
        return [Group("published", None)]
    order = sorted(groups, key=lambda k: (k[0] != "published", k[0], k[1], k[2] != DEFAULT_PRECISION, k[2]))
    return [groups[k] for k in order]


def profile_of(table: "Table", name: str) -> Optional["Profile"]:
    return table.profiles.get(name)


def baseline_result(table: "Table", profile: "Profile", group: Group, engine: str) -> Optional[Result]:
    """Our baseline result for ``engine``; the plain-model baseline is the same whichever engine recorded it."""
    candidates = [engine]
    base_rows = [r for r in profile.rows if r.name == table.baseline]
    if base_rows and base_rows[0].balance is None and engine != DEFAULT_ENGINE:
        # The plain model is the same whichever engine's run recorded it.
        candidates.append(DEFAULT_ENGINE)
    for name in candidates:
        result = group.get(table.baseline, name)
        if result is not None and result.status == "ok" and result.value is not None and result.value > 0:
            return result
    return None


def speedup_of(table: "Table", profile: "Profile", group: Group, result: Optional[Result]) -> Optional[float]:
    if result is None or result.status != "ok" or result.value is None:
        return None
    base = baseline_result(table, profile, group, result.engine)
    if base is None or base.value is None:
        return None
    return result.value / base.value


def row_label(row_name: str, engine: str, result: Optional[Result] = None) -> str:
    """``pipeline-2``, ``pipeline-2 (torchgpipe)``; a run with settings of its own adds them: ``[balance 192,178]``."""
    label = row_name if engine == DEFAULT_ENGINE else f"{row_name} ({engine})"
    changed = result.overrides if result is not None else {}
    return f"{label} [{settings_label(changed)}]" if changed else label


class Slot(NamedTuple):
    """A line of a table: the config's row, the engine, and the record shown (None: not measured)."""

    row: "Row"
    engine: str
    result: Optional[Result]

    @property
    def own(self) -> bool:
        """Whether the line is the row as configured (else a run with settings of its own, shown apart)."""
        return self.result is None or not self.result.overrides

    @property
    def label(self) -> str:
        return row_label(self.row.name, self.engine, self.result)


def row_slots(profile: "Profile", group: Group) -> List[Slot]:
    """Rows in config order; ours always, other engines' right after where they measured the row, and
    after each, its runs with settings of their own."""
    slots: List[Slot] = []
    for row in profile.rows:
        for engine in group.engines():
            result = group.get(row.name, engine)
            if engine == DEFAULT_ENGINE or result is not None:
                slots.append(Slot(row, engine, result))
            slots += [Slot(row, engine, variant) for variant in group.variants_of(row.name, engine)]
    return slots


def group_heading(table: "Table", group: Group) -> str:
    if group.hardware is None:
        return f"{table.title}: no results yet"
    envs = [r.environment for r in group.all()]
    env = envs[0]
    gpus = [str(n) for n in env.get("gpus") or []]
    if gpus and not group.hardware.startswith("cpu-"):
        counts: Dict[str, int] = {}
        for name in gpus:
            counts[name] = counts.get(name, 0) + 1
        devices = ", ".join(f"{n}× {name}" for name, n in counts.items())
    else:
        cores = env.get("usable_cores") or env.get("cpu_count")
        devices = f"{env.get('cpu_model') or 'unknown CPU'}, {cores} cores"
    torches = sorted({str(e.get("torch")) for e in envs if e.get("torch")})
    dates = sorted({r.created[:10] for r in group.all()})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    software = f"; torch {', '.join(torches)}" if torches else ""
    verb = "predicted" if all(r.status == "predicted" for r in group.all()) else "measured"
    how = f"{group.profile} profile" + (f", {group.precision}" if group.precision != DEFAULT_PRECISION else "")
    return f"{table.title} on {group.hardware} ({how}): {devices}{software}; {verb} {when}"


def unknown_profile(table: "Table", group: Group) -> str:
    return f"{group_heading(table, group)}\n(profile {group.profile!r} is not in {table.path}; not shown)"


def stray_rows(profile: "Profile", group: Group) -> List[str]:
    known = {row.name for row in profile.rows}
    return sorted({r.experiment for r in group.all() if r.experiment not in known})


def on_row_devices(row: "Row", result: Optional[Result]) -> bool:
    """Whether ``result`` ran on the row's device count (an interleaved run puts several stages per process)."""
    processes = result.extra.get("processes") if result is not None else None
    return processes is None or processes == row.devices


def of_ideal_cell(row: "Row", speedup: Optional[float], result: Optional[Result] = None) -> str:
    """Measured / ideal speedup, the ideal of the settings ``result`` ran (the row's without one)."""
    ideal = ideal_speedup_of(row, result)
    if ideal is None or speedup is None:
        return DASH
    return f"{speedup / ideal:.2f} of {ideal:.2f}x"


Grid = Tuple[List[str], List[List[str]], List[str]]


def render_groups(
    table: "Table",
    results: Sequence[Result],
    fmt: str,
    grid: Callable[["Profile", Group], Grid],
    notes: Optional[Callable[["Profile", Group], List[str]]] = None,
) -> str:
    """One table per (hardware, profile) group: heading, grid, notes, and rows the config does not know."""

    def block(profile: "Profile", group: Group) -> str:
        headers, rows, aligns = grid(profile, group)
        parts = [group_heading(table, group), render_grid(headers, rows, aligns, fmt)]
        if notes is not None:
            parts += notes(profile, group)
        strays = stray_rows(profile, group)
        if strays:
            parts.append(f"Results for rows not in the config (not shown): {', '.join(strays)}")
        return "\n\n".join(parts)

    return join_blocks(for_groups(table, results, block))


def for_groups(table: "Table", results: Sequence[Result], block: Callable[["Profile", Group], str]) -> List[str]:
    """A text block per (hardware, profile) group of ``results``; a notice for profiles the config lacks."""
    blocks: List[str] = []
    for group in group_results(table, results):
        profile = profile_of(table, group.profile)
        blocks.append(unknown_profile(table, group) if profile is None else block(profile, group))
    return blocks
