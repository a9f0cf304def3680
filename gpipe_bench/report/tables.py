"""The published tables (speed, memory, accuracy) over saved results, one table per machine and profile.

Each hardware key gets its own table, under a heading that names the
machine, the software and the dates, because absolute figures are
meaningless without them. A run with settings of its own stands after its
row, labelled with what differs and with no published figures beside it: they
are its row's, not its own. Summary lines read each record's own settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from gpipe_bench.results import DEFAULT_ENGINE, Result

from .format import DASH, abbrev, fmt_num, format_gib, lf_label, mean_std, memory_cell, seed_stats, status_cell
from .groups import (
    Grid,
    Group,
    baseline_result,
    group_results,
    of_ideal_cell,
    on_row_devices,
    profile_of,
    render_groups,
    row_label,
    row_slots,
    speedup_of,
)

if TYPE_CHECKING:  # config imports models; rendering needs only the attributes
    from gpipe_bench.config import Profile, Table


def speed_table(table: "Table", results: Sequence[Result], *, fmt: str = "rst", published: bool = True) -> str:
    """The published layout (Experiment | Throughput | Speedup), one table per hardware key and profile.

    With ``published``, the published figures stand beside ours, and
    multi-device pipeline rows show measured / ideal speedup.
    """

    def grid(profile: "Profile", group: Group) -> Grid:
        headers = ["Experiment", "Throughput", "Speedup"]
        if published:
            headers += ["Published", "Published speedup", "Measured / ideal"]
        rows = []
        for slot in row_slots(profile, group):
            row, result = slot.row, slot.result
            speedup = speedup_of(table, profile, group, result)
            cells = [
                slot.label,
                status_cell(result, lambda v: f"{v:.3f} {table.unit}"),
                fmt_num(speedup, 3, "x"),
            ]
            if published:
                values = row.published.values if slot.own else {}
                cells += [
                    fmt_num(values.get("throughput"), 3),
                    fmt_num(values.get("speedup"), 3, "x"),
                    of_ideal_cell(row, speedup, result) if on_row_devices(row, result) else DASH,
                ]
            rows.append(cells)
        return headers, rows, ["left"] + ["right"] * (len(headers) - 1)

    return render_groups(
        table,
        results,
        fmt,
        grid,
        lambda profile, group: _same_devices(table, profile, group) + _planned(profile, group) + _apart(group),
    )


def _apart(group: Group) -> List[str]:
    """Says why the runs with settings of their own have no published figures beside them."""
    if not group.variants:
        return []
    return [
        "Rows with [settings] ran with settings other than their config row's: shown apart, "
        "not compared with the published figures."
    ]


def _balance(result: Result) -> str:
    """The balance ``result`` ran, as recorded."""
    return ",".join(str(b) for b in result.settings.get("balance") or []) or "?"


def _planned(profile: "Profile", group: Group) -> List[str]:
    """A ``balance: planned`` row over the published row it was planned beside: what the balance alone buys.

    The two rows share every setting but the balance (the config says so), so
    their ratio on the same machine and engine is the planner's gain. Both
    records are their rows' own (never a run with settings of its own) and each
    balance is the one its record ran.
    """
    found = []
    for row in profile.rows:
        if not row.planned:
            continue
        published = next(
            (
                r
                for r in profile.rows
                if not r.planned and r.mode == row.mode and r.devices == row.devices and r.batch == row.batch
            ),
            None,
        )
        if published is None:
            continue
        for engine in group.engines():
            ours, base = group.get(row.name, engine), group.get(published.name, engine)
            if ours is None or base is None or ours.status != "ok" or base.status != "ok":
                continue
            if not ours.value or not base.value:
                continue
            found.append(
                f"{row.name} [{_balance(ours)}] / {published.name} [{_balance(base)}] "
                f"({engine}): {ours.value / base.value:.3f}x"
            )
    return [f"Planned balance against the published one: {'; '.join(found)}."] if found else []


def _same_devices(table: "Table", profile: "Profile", group: Group) -> List[str]:
    """pipeline-N over naive-N measured by the same engine: what pipelining buys on the same N devices or processes.

    The Speedup column compares with the baseline row (one device, all its
    cores); this line compares like with like, the model split the same way
    with and without micro-batches. Pairs the Speedup column already shows
    (naive-N is the baseline) are left out. A pipeline run with settings of its own
    is set against naive-N's own record, labelled with what it changed.
    """
    found = []
    for row, engine, ours in row_slots(profile, group):
        naive = next((r for r in profile.rows if r.mode == "naive" and r.devices == row.devices), None)
        if row.mode != "pipeline" or naive is None:
            continue
        base = group.get(naive.name, engine)
        if (
            ours is None
            or base is None
            or ours.status != "ok"
            or base.status != "ok"
            or not ours.value
            or not base.value
            or baseline_result(table, profile, group, engine) is base
        ):
            continue
        count = ours.extra.get("processes")
        where = f"{count} processes" if count else f"{len(ours.settings.get('balance') or ()) or row.devices} devices"
        found.append(
            f"{row_label(row.name, DEFAULT_ENGINE, ours)} / {naive.name} on the same {where} ({engine}): "
            f"{ours.value / base.value:.3f}x"
        )
    return [f"Pipelining over the same devices: {'; '.join(found)}."] if found else []


def _memory_table(table: "Table", results: Sequence[Result], fmt: str, published: bool) -> str:
    def grid(profile: "Profile", group: Group) -> Grid:
        headers = [
            "Experiment",
            "(L, F)",
            "Parameters",
            "Total Model Parameter Memory",
            "Total Peak Activation Memory",
            "Predicted",
            "Predicted / measured",
        ]
        reserved = any(r.extra.get("predicted_reserved_gib") is not None for r in group.results.values())
        if reserved:  # CUDA rows: the Predicted column is reserved (the published quantity); allocated beside it
            headers.insert(6, "Predicted allocated")
        if published:
            headers += ["Published model memory", "Published peak activation"]
        rows = []
        for slot in row_slots(profile, group):
            row, result = slot.row, slot.result
            extra = result.extra if result is not None else {}
            cells = [
                slot.label,
                lf_label(table, row),
                abbrev(extra.get("parameters")),
                format_gib(extra.get("model_memory_gib")),
                memory_cell(result),
                format_gib(_predicted(extra)),
                fmt_num(extra.get("predicted_reserved_over_measured", extra.get("predicted_over_measured")), 3),
            ]
            if reserved:
                cells.insert(6, format_gib(extra.get("predicted_allocated_gib")))
            if published:
                values = row.published.values if slot.own else {}
                peak = values.get("peak_activation_gb")
                cells += [
                    fmt_num(values.get("model_memory_gb"), 2, "GB"),
                    fmt_num(peak, 2, "GB") if peak is not None else str(values.get("status") or "--"),
                ]
            rows.append(cells)
        return headers, rows, ["left", "left"] + ["right"] * (len(headers) - 2)

    text = render_groups(table, results, fmt, grid)
    methods = _recorded(table, results, "method")
    if methods:
        text += (
            "\nPeak activation memory: the sum over devices of each device's peak during the training steps, "
            "model memory excluded; measured as " + "; ".join(methods) + ". Predicted from the meta device "
            "(gpipe_bench.memory.predict). Published columns are labelled GB but are GiB.\n"
        )
    allocators = _recorded(table, results, "predicted_allocator", status=None)
    if allocators:
        text += (
            "Predicted on CUDA rows: what the caching allocator reserves minus the model memory (the published "
            "quantity), Predicted allocated beside it; the allocation trace of the steps replayed through a model "
            "of " + "; ".join(allocators) + " (gpipe_bench.memory.reserved; cuDNN's workspaces not counted).\n"
        )
    bases = _recorded(table, results, "predicted_compared_with")
    if bases:
        text += (
            "Predicted / measured: the prediction over " + "; ".join(bases) + " (on CUDA with a predicted reserved "
            "peak: reserved over the measured reserved).\n"
        )
    return text


def _predicted(extra: Dict[str, Any]) -> Any:
    """A memory record's Predicted figure: reserved where the allocator was modelled (CUDA), else held bytes."""
    reserved = extra.get("predicted_reserved_gib")
    return reserved if reserved is not None else extra.get("predicted_gib")


def _recorded(table: "Table", results: Sequence[Result], key: str, status: Optional[str] = "ok") -> List[str]:
    """The distinct values of ``extra[key]`` over the table's records of ``status`` (None: any), sorted."""
    return sorted(
        {
            str(r.extra[key])
            for r in results
            if r.table == table.name and (status is None or r.status == status) and r.extra.get(key)
        }
    )


def memory_per_device(table: "Table", results: Sequence[Result], *, fmt: str = "rst") -> str:
    """Each device of each row: model memory, measured and predicted peak activation, and when the peak falls."""

    def grid(profile: "Profile", group: Group) -> Grid:
        # CUDA records have the allocated peak too (what the prediction is compared with); CPU ones one figure.
        cuda = any(r.extra.get("allocated_per_device_gib") for r in group.all())
        # CUDA rows predicted through the allocator model: what it reserves and allocates, per device.
        allocator = any(r.extra.get("predicted_reserved_per_device_gib") for r in group.all())
        headers = ["Experiment", "Device", "Model memory", "Peak activation"]
        headers += ["Allocated"] if cuda else []
        headers += ["Predicted reserved", "Predicted allocated"] if allocator else []
        headers += ["Predicted held", "Predicted peak at"] if allocator else ["Predicted", "Predicted peak at"]
        rows: List[List[str]] = []
        for slot in row_slots(profile, group):
            result = slot.result
            if result is None:
                continue
            extra = result.extra
            names = list(extra.get("devices") or [])
            model = list(extra.get("model_memory_per_device_gib") or [])
            measured = list(extra.get("measured_per_device_gib") or [])
            allocated = list(extra.get("allocated_per_device_gib") or [])
            predicted = list(extra.get("predicted_per_device_gib") or [])
            reserved = list(extra.get("predicted_reserved_per_device_gib") or [])
            reserved_allocated = list(extra.get("predicted_allocated_per_device_gib") or [])
            when = list(extra.get("predicted_peak_at") or [])
            for k, name in enumerate(names):
                if measured:
                    ours = format_gib(measured[k]) if k < len(measured) else DASH
                else:
                    ours = "Out of memory" if result.status == "oom" else "not measured"
                cells = [
                    slot.label if k == 0 else "",
                    str(name),
                    format_gib(model[k]) if k < len(model) else DASH,
                    ours,
                ]
                cells += [format_gib(allocated[k]) if k < len(allocated) else DASH] if cuda else []
                if allocator:
                    cells += [
                        format_gib(reserved[k]) if k < len(reserved) else DASH,
                        format_gib(reserved_allocated[k]) if k < len(reserved_allocated) else DASH,
                    ]
                cells += [
                    format_gib(predicted[k]) if k < len(predicted) else DASH,
                    str(when[k]) if k < len(when) else DASH,
                ]
                rows.append(cells)
        return headers, rows, ["left", "left"] + ["right"] * (len(headers) - 3) + ["left"]

    return render_groups(table, results, fmt, grid)


def _accuracy_table(table: "Table", results: Sequence[Result], fmt: str, published: bool) -> str:
    def grid(profile: "Profile", group: Group) -> Grid:
        headers = ["Experiment", "Top-1 error (%)"] + (["Published"] if published else [])
        rows = []
        for slot in row_slots(profile, group):
            row, result = slot.row, slot.result
            if result is None or result.status != "ok":
                ours = status_cell(result, str)
            else:
                ours = mean_std(result)
            cells = [slot.label, ours]
            if published:
                values = row.published.values if slot.own else {}
                err, std = values.get("top1_error"), values.get("top1_error_std")
                cells.append(fmt_num(err, 2) + ("±" + fmt_num(std, 2) if std is not None and err is not None else ""))
            rows.append(cells)
        return headers, rows, ["left"] + ["right"] * (len(headers) - 1)

    return render_groups(table, results, fmt, grid)


#: A pipeline row learns what data parallelism learns when its mean error differs from the data-parallel
#: row of its batch by less than this many of the larger standard deviation ...
SPREAD_STDS = 2.0
#: ... or than this many points, whichever is more (three seeds can agree by luck far closer than the noise).
SPREAD_FLOOR = 0.5


def transparency(table: "Table", results: Sequence[Result]) -> List[str]:
    """Each pipeline row against the data-parallel row of its batch: difference, the spread it is judged by, verdict."""
    return [line for line, _ in _judge_transparency(table, results)]


def transparency_outside(table: "Table", results: Sequence[Result]) -> List[str]:
    """The pipeline rows whose error leaves the data-parallel spread: what ``compare --check`` fails on."""
    return [line for line, outside in _judge_transparency(table, results) if outside]


def _judge_transparency(table: "Table", results: Sequence[Result]) -> List[Tuple[str, bool]]:
    """(line, outside) per pipeline row of an accuracy table.

    A pipeline row is compared with the data-parallel row of the same batch;
    one without such a row (pipeline-4k) is named and not judged: with a
    fixed number of epochs the batch sets the number of steps, which is not
    what pipelining changes. "Within" means the means differ by less than
    max(:data:`SPREAD_STDS` x the larger standard deviation, :data:`SPREAD_FLOOR` points).
    """
    out: List[Tuple[str, bool]] = []
    for group in group_results(table, results):
        profile = profile_of(table, group.profile)
        if profile is None or group.hardware is None:
            continue
        done = {row.name: group.get(row.name, DEFAULT_ENGINE) for row in profile.rows}
        ok = {name: r for name, r in done.items() if r is not None and r.status == "ok" and r.samples}
        dp = [row for row in profile.rows if row.mode == "dataparallel" and row.name in ok]
        for row in profile.rows:
            if row.mode != "pipeline" or row.name not in ok:
                continue
            peers = [d for d in dp if d.batch == row.batch]
            if not peers:
                what = "measured" if not dp else f"at batch {row.batch}"
                out.append(
                    (
                        f"{row.name} ({group.profile}, {group.hardware}): no data-parallel row {what} to compare "
                        "with; not judged (the batch, not the pipeline, sets the number of steps)",
                        False,
                    )
                )
                continue
            mean, std, n = seed_stats(ok[row.name])
            for peer in peers:
                pmean, pstd, pn = seed_stats(ok[peer.name])
                bound = max(SPREAD_STDS * max(std, pstd), SPREAD_FLOOR)
                difference = mean - pmean
                within = abs(difference) < bound
                out.append(
                    (
                        f"{row.name} {mean:.2f}±{std:.2f} (n={n}) vs {peer.name} {pmean:.2f}±{pstd:.2f} (n={pn}) "
                        f"({group.profile}, {group.hardware}): difference {difference:+.2f} points, judged by "
                        f"max({SPREAD_STDS:g} std, {SPREAD_FLOOR:g}) = {bound:.2f}: "
                        f"{'within' if within else 'OUTSIDE'} the data-parallel spread",
                        not within,
                    )
                )
    return out


def render(table: "Table", results: Sequence[Result], *, fmt: str = "rst", published: bool = True) -> str:
    """The table of ``table.kind`` (speed, memory or accuracy) over ``results``."""
    if table.kind == "speed":
        return speed_table(table, results, fmt=fmt, published=published)
    if table.kind == "memory":
        return _memory_table(table, results, fmt, published)
    if table.kind == "accuracy":
        return _accuracy_table(table, results, fmt, published)
    raise ValueError(f"unknown table kind {table.kind!r} in {table.path}")
