"""Tables of saved results in the published layout, and the comparison with the published numbers.

Rendering is a separate step over saved :class:`~gpipe_bench.results.Result`
records, so any set of results (one row re-run today, the rest last week) can be
shown together. Speedups are only ever taken between results of the same
table, profile, hardware and engine: a ratio of figures from two machines
means nothing. Each hardware key gets its own table, under a heading that names
the machine, the software and the dates, because absolute figures are
meaningless without them.

:func:`compare` checks ours against the published figures by the ratio of
speedups (absolute throughput depends on the card), shows measured / ideal
pipeline speedup per the performance model (:mod:`gpipe_bench.perf`), and also checks the
published data for internal consistency: a slip in the source is flagged,
never silently "reproduced".
"""

from __future__ import annotations

import importlib
import math
import re
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, cast

from . import perf
from .results import DEFAULT_ENGINE, Result

if TYPE_CHECKING:  # config imports models; rendering needs only the attributes
    from .config import Profile, Row, Table

__all__ = [
    "Comparison",
    "speed_table",
    "render",
    "compare",
    "format_gib",
    "memory_per_device",
    "transparency",
    "mean_std",
]

# tabulate ships no type information; one typed handle keeps mypy --strict meaningful here.
tabulate = cast(Callable[..., str], importlib.import_module("tabulate").tabulate)

_DASH = "–"
_FORMATS = {"rst": "rst", "md": "github"}
# Published values are keyed by what the source printed; the table's metric may be spelled differently.
_PUBLISHED_KEY = {"peak_activation_memory": "peak_activation_gb"}


def _ideal(row: "Row") -> Optional[float]:
    return perf.ideal_speedup(row.mode, row.devices, row.batch, row.chunks, row.checkpoint)


# -- grouping ------------------------------------------------------------------------------------------------------


@dataclass
class _Group:
    """The results of one table measured under one profile on one machine."""

    profile: str
    hardware: Optional[str]  # None: no results at all
    results: Dict[Tuple[str, str], Result] = field(default_factory=dict)  # (experiment, engine) -> newest

    def engines(self) -> List[str]:
        engines = {engine for _, engine in self.results}
        return [DEFAULT_ENGINE] + sorted(engines - {DEFAULT_ENGINE})

    def get(self, experiment: str, engine: str) -> Optional[Result]:
        return self.results.get((experiment, engine))


def _groups(table: "Table", results: Sequence[Result]) -> List[_Group]:
    groups: Dict[Tuple[str, str], _Group] = {}
    for result in results:
        if result.table != table.name:
            continue
        key = (result.profile, result.hardware_key())
        group = groups.setdefault(key, _Group(*key))
        slot = (result.experiment, result.engine)
        if slot not in group.results or group.results[slot].created <= result.created:
            group.results[slot] = result
    if not groups:
        return [_Group("published", None)]
    order = sorted(groups, key=lambda k: (k[0] != "published", k[0], k[1]))
    return [groups[k] for k in order]


def _profile(table: "Table", name: str) -> Optional["Profile"]:
    return table.profiles.get(name)


def _baseline(table: "Table", profile: "Profile", group: _Group, engine: str) -> Optional[Result]:
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


def _speedup(table: "Table", profile: "Profile", group: _Group, result: Optional[Result]) -> Optional[float]:
    if result is None or result.status != "ok" or result.value is None:
        return None
    base = _baseline(table, profile, group, result.engine)
    if base is None or base.value is None:
        return None
    return result.value / base.value


def _label(row_name: str, engine: str) -> str:
    return row_name if engine == DEFAULT_ENGINE else f"{row_name} ({engine})"


def _row_slots(profile: "Profile", group: _Group) -> List[Tuple["Row", str, Optional[Result]]]:
    """Rows in config order; ours always, other engines' right after where they measured the row."""
    slots: List[Tuple["Row", str, Optional[Result]]] = []
    for row in profile.rows:
        for engine in group.engines():
            result = group.get(row.name, engine)
            if engine == DEFAULT_ENGINE or result is not None:
                slots.append((row, engine, result))
    return slots


def _heading(table: "Table", group: _Group) -> str:
    if group.hardware is None:
        return f"{table.title}: no results yet"
    envs = [r.environment for r in group.results.values()]
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
    dates = sorted({r.created[:10] for r in group.results.values()})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    software = f"; torch {', '.join(torches)}" if torches else ""
    verb = "predicted" if all(r.status == "predicted" for r in group.results.values()) else "measured"
    return f"{table.title} on {group.hardware} ({group.profile} profile): {devices}{software}; {verb} {when}"


def _unknown_profile(table: "Table", group: _Group) -> str:
    return f"{_heading(table, group)}\n(profile {group.profile!r} is not in {table.path}; not shown)"


def _strays(profile: "Profile", group: _Group) -> List[str]:
    known = {row.name for row in profile.rows}
    return sorted({exp for exp, _ in group.results if exp not in known})


# -- formatting ----------------------------------------------------------------------------------------------------


def _grid(headers: Sequence[str], rows: Sequence[Sequence[str]], aligns: Sequence[str], fmt: str) -> str:
    if fmt not in _FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; use one of {', '.join(_FORMATS)}")
    if fmt == "md":
        return tabulate(rows, headers=list(headers), tablefmt="github", colalign=list(aligns), disable_numparse=True)
    # The published RST tables have left-aligned headers over right-aligned figures and no padding beyond the
    # widest cell; tabulate pads headers, so the header goes in as a (pre-padded) row and gets its rule here.
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    head = [h.ljust(w) for h, w in zip(headers, widths)]
    text = tabulate(
        [head] + [list(r) for r in rows],
        tablefmt="rst",
        colalign=list(aligns),
        disable_numparse=True,
        preserve_whitespace=True,
    )
    lines = text.splitlines()
    return "\n".join(lines[:2] + [lines[0]] + lines[2:])


def _num(value: Any, digits: int, suffix: str = "") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}{suffix}"
    return _DASH


def _status_cell(result: Optional[Result], ok: Callable[[float], str]) -> str:
    if result is None:
        return _DASH
    if result.status == "oom":
        return "Out of memory"
    if result.status != "ok":
        return result.status
    return ok(result.value) if result.value is not None else "--"


def _float(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _published_value(table: "Table", row: "Row") -> Optional[float]:
    values = row.published.values
    return _float(values.get(table.metric, values.get(_PUBLISHED_KEY.get(table.metric, table.metric))))


def _on_row_devices(row: "Row", result: Optional[Result]) -> bool:
    """Whether ``result`` ran on the row's device count (an interleaved run puts several stages per process)."""
    processes = result.extra.get("processes") if result is not None else None
    return processes is None or processes == row.devices


def _of_ideal(row: "Row", speedup: Optional[float]) -> str:
    ideal = _ideal(row)
    if ideal is None or speedup is None:
        return _DASH
    return f"{speedup / ideal:.2f} of {ideal:.2f}x"


def _join(blocks: List[str]) -> str:
    return "\n\n".join(b for b in blocks if b) + "\n"


# -- speed ---------------------------------------------------------------------------------------------------------


def speed_table(table: "Table", results: Sequence[Result], *, fmt: str = "rst", published: bool = True) -> str:
    """The published layout (Experiment | Throughput | Speedup), one table per hardware key and profile.

    With ``published``, the published figures stand beside ours, and
    multi-device pipeline rows show measured / ideal speedup.
    """

    def grid(profile: "Profile", group: _Group) -> _Grid:
        headers = ["Experiment", "Throughput", "Speedup"]
        if published:
            headers += ["Published", "Published speedup", "Measured / ideal"]
        rows = []
        for row, engine, result in _row_slots(profile, group):
            speedup = _speedup(table, profile, group, result)
            cells = [
                _label(row.name, engine),
                _status_cell(result, lambda v: f"{v:.3f} {table.unit}"),
                _num(speedup, 3, "x"),
            ]
            if published:
                values = row.published.values
                cells += [
                    _num(values.get("throughput"), 3),
                    _num(values.get("speedup"), 3, "x"),
                    _of_ideal(row, speedup) if _on_row_devices(row, result) else _DASH,
                ]
            rows.append(cells)
        return headers, rows, ["left"] + ["right"] * (len(headers) - 1)

    return _render_groups(table, results, fmt, grid, lambda profile, group: _same_devices(table, profile, group))


def _same_devices(table: "Table", profile: "Profile", group: _Group) -> List[str]:
    """pipeline-N over naive-N measured by the same engine: what pipelining buys on the same N devices or processes.

    The Speedup column compares with the baseline row (one device, all its
    cores); this line compares like with like, the model split the same way
    with and without micro-batches. Pairs the Speedup column already shows
    (naive-N is the baseline) are left out.
    """
    found = []
    for row in profile.rows:
        if row.mode != "pipeline":
            continue
        naive = next((r for r in profile.rows if r.mode == "naive" and r.devices == row.devices), None)
        if naive is None:
            continue
        for engine in group.engines():
            ours, base = group.get(row.name, engine), group.get(naive.name, engine)
            if (
                ours is None
                or base is None
                or ours.status != "ok"
                or base.status != "ok"
                or not ours.value
                or not base.value
                or _baseline(table, profile, group, engine) is base
            ):
                continue
            count = ours.extra.get("processes")
            where = f"{count} processes" if count else f"{row.devices} devices"
            found.append(f"{row.name} / {naive.name} on the same {where} ({engine}): {ours.value / base.value:.3f}x")
    return [f"Pipelining over the same devices: {'; '.join(found)}."] if found else []


_Grid = Tuple[List[str], List[List[str]], List[str]]


def _render_groups(
    table: "Table",
    results: Sequence[Result],
    fmt: str,
    grid: Callable[["Profile", _Group], _Grid],
    notes: Optional[Callable[["Profile", _Group], List[str]]] = None,
) -> str:
    """One table per (hardware, profile) group: heading, grid, notes, and rows the config does not know."""

    def block(profile: "Profile", group: _Group) -> str:
        headers, rows, aligns = grid(profile, group)
        parts = [_heading(table, group), _grid(headers, rows, aligns, fmt)]
        if notes is not None:
            parts += notes(profile, group)
        strays = _strays(profile, group)
        if strays:
            parts.append(f"Results for rows not in the config (not shown): {', '.join(strays)}")
        return "\n\n".join(parts)

    return _join(_for_groups(table, results, block))


def _for_groups(table: "Table", results: Sequence[Result], block: Callable[["Profile", _Group], str]) -> List[str]:
    """A text block per (hardware, profile) group of ``results``; a notice for profiles the config lacks."""
    blocks: List[str] = []
    for group in _groups(table, results):
        profile = _profile(table, group.profile)
        blocks.append(_unknown_profile(table, group) if profile is None else block(profile, group))
    return blocks


# -- memory and accuracy -------------------------------------------------------------------------------------------


def _abbrev(count: Any) -> str:
    if not isinstance(count, int) or isinstance(count, bool):
        return _DASH
    if count >= 1e9:
        return f"{count / 1e9:.2f}B"
    if count >= 1e7:
        return f"{count / 1e6:.0f}M"  # the published rounding: 90M, 358M
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.0f}K"


def _lf(table: "Table", row: "Row") -> str:
    args = {**dict(table.model_args), **dict(row.model_args)}
    if "num_layers" in args and "num_filters" in args:
        return f"({args['num_layers']}, {args['num_filters']})"
    return _DASH


def format_gib(gib: Any) -> str:
    """A memory figure in GiB, or in MiB below 1 GiB (the quick profile's figures are small): units always shown."""
    value = _float(gib)
    if value is None or not math.isfinite(value):
        return _DASH
    return f"{value:.2f} GiB" if abs(value) >= 1 else f"{value * 1024:.1f} MiB"


def _memory_cell(result: Optional[Result]) -> str:
    if result is not None and result.status == "predicted":
        return "not measured"
    return _status_cell(result, format_gib)


def _memory_table(table: "Table", results: Sequence[Result], fmt: str, published: bool) -> str:
    def grid(profile: "Profile", group: _Group) -> _Grid:
        headers = [
            "Experiment",
            "(L, F)",
            "Parameters",
            "Total Model Parameter Memory",
            "Total Peak Activation Memory",
            "Predicted",
        ]
        if published:
            headers += ["Published model memory", "Published peak activation"]
        rows = []
        for row, engine, result in _row_slots(profile, group):
            extra = result.extra if result is not None else {}
            cells = [
                _label(row.name, engine),
                _lf(table, row),
                _abbrev(extra.get("parameters")),
                format_gib(extra.get("model_memory_gib")),
                _memory_cell(result),
                format_gib(extra.get("predicted_gib")),
            ]
            if published:
                values = row.published.values
                peak = values.get("peak_activation_gb")
                cells += [
                    _num(values.get("model_memory_gb"), 2, "GB"),
                    _num(peak, 2, "GB") if peak is not None else str(values.get("status") or "--"),
                ]
            rows.append(cells)
        return headers, rows, ["left", "left"] + ["right"] * (len(headers) - 2)

    text = _render_groups(table, results, fmt, grid)
    methods = sorted(
        {
            str(r.extra["method"])
            for r in results
            if r.table == table.name and r.status == "ok" and r.extra.get("method")
        }
    )
    if methods:
        text += (
            "\nPeak activation memory: the sum over devices of each device's peak during the training steps, "
            "model memory excluded; measured as " + "; ".join(methods) + ". Predicted from the meta device "
            "(gpipe_bench.memory.predict). Published columns are labelled GB but are GiB.\n"
        )
    return text


def memory_per_device(table: "Table", results: Sequence[Result], *, fmt: str = "rst") -> str:
    """Each device of each row: model memory, measured and predicted peak activation, and when the peak falls."""

    def grid(profile: "Profile", group: _Group) -> _Grid:
        headers = ["Experiment", "Device", "Model memory", "Peak activation", "Predicted", "Predicted peak at"]
        rows: List[List[str]] = []
        for row, engine, result in _row_slots(profile, group):
            if result is None:
                continue
            extra = result.extra
            names = list(extra.get("devices") or [])
            model = list(extra.get("model_memory_per_device_gib") or [])
            measured = list(extra.get("measured_per_device_gib") or [])
            predicted = list(extra.get("predicted_per_device_gib") or [])
            when = list(extra.get("predicted_peak_at") or [])
            for k, name in enumerate(names):
                if measured:
                    ours = format_gib(measured[k]) if k < len(measured) else _DASH
                else:
                    ours = "Out of memory" if result.status == "oom" else "not measured"
                rows.append(
                    [
                        _label(row.name, engine) if k == 0 else "",
                        str(name),
                        format_gib(model[k]) if k < len(model) else _DASH,
                        ours,
                        format_gib(predicted[k]) if k < len(predicted) else _DASH,
                        str(when[k]) if k < len(when) else _DASH,
                    ]
                )
        return headers, rows, ["left", "left", "right", "right", "right", "left"]

    return _render_groups(table, results, fmt, grid)


def mean_std(result: Result) -> str:
    """``mean±std`` of a result's samples (seeds), two decimals."""
    if result.samples:
        mean, std, _ = _stats(result)
        return f"{mean:.2f}±{std:.2f}"
    return f"{result.value:.2f}" if result.value is not None else "--"


def _accuracy_table(table: "Table", results: Sequence[Result], fmt: str, published: bool) -> str:
    def grid(profile: "Profile", group: _Group) -> _Grid:
        headers = ["Experiment", "Top-1 error (%)"] + (["Published"] if published else [])
        rows = []
        for row, engine, result in _row_slots(profile, group):
            if result is None or result.status != "ok":
                ours = _status_cell(result, str)
            else:
                ours = mean_std(result)
            cells = [_label(row.name, engine), ours]
            if published:
                values = row.published.values
                err, std = values.get("top1_error"), values.get("top1_error_std")
                cells.append(_num(err, 2) + ("±" + _num(std, 2) if std is not None and err is not None else ""))
            rows.append(cells)
        return headers, rows, ["left"] + ["right"] * (len(headers) - 1)

    return _render_groups(table, results, fmt, grid)


def _stats(result: Result) -> Tuple[float, float, int]:
    samples = [float(v) for v in result.samples]
    std = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return statistics.fmean(samples), std, len(samples)


def transparency(table: "Table", results: Sequence[Result]) -> List[str]:
    """Whether each pipeline row's mean error sits within the data-parallel rows' spread (accuracy tables).

    A pipeline row is compared with the data-parallel row of the same batch;
    one without such a row (pipeline-4k) is named and not judged: with a
    fixed number of epochs the batch sets the number of steps, which is not
    what pipelining changes. "Within" means the means differ by less than two
    standard deviations of either row.
    """
    lines: List[str] = []
    for group in _groups(table, results):
        profile = _profile(table, group.profile)
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
                lines.append(
                    f"{row.name} ({group.profile}, {group.hardware}): no data-parallel row {what} to compare "
                    "with; not judged (the batch, not the pipeline, sets the number of steps)"
                )
                continue
            mean, std, n = _stats(ok[row.name])
            for peer in peers:
                pmean, pstd, pn = _stats(ok[peer.name])
                bound = 2 * max(std, pstd)
                within = abs(mean - pmean) < bound
                lines.append(
                    f"{row.name} {mean:.2f}±{std:.2f} (n={n}) vs {peer.name} {pmean:.2f}±{pstd:.2f} (n={pn}) "
                    f"({group.profile}, {group.hardware}): difference {abs(mean - pmean):.2f} "
                    f"{'<' if within else '>='} 2 std {bound:.2f}: "
                    f"{'within' if within else 'OUTSIDE'} the data-parallel spread"
                )
    return lines


def render(table: "Table", results: Sequence[Result], *, fmt: str = "rst", published: bool = True) -> str:
    """The table of ``table.kind`` (speed, memory or accuracy) over ``results``."""
    if table.kind == "speed":
        return speed_table(table, results, fmt=fmt, published=published)
    if table.kind == "memory":
        return _memory_table(table, results, fmt, published)
    if table.kind == "accuracy":
        return _accuracy_table(table, results, fmt, published)
    raise ValueError(f"unknown table kind {table.kind!r} in {table.path}")


# -- compare -------------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Ours against the published figures: a dict per row, the regressions, slips in the published data, text."""

    rows: List[Dict[str, Any]]
    regressions: List[str]
    inconsistencies: List[str]
    text: str


_COUNT = re.compile(r"^\s*([0-9]+)(?:\.([0-9]+))?\s*([KMBT]?)\s*$", re.IGNORECASE)
_SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def _count_interval(value: Any) -> Optional[Tuple[float, float, float]]:
    """(low, nominal, high) of a parameter count: exact for ints, ± half the last printed digit for "1.16B"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value), float(value), float(value)
    match = _COUNT.match(str(value)) if isinstance(value, str) else None
    if match is None:
        return None
    whole, frac, unit = match.groups()
    scale = _SCALE[unit.upper()]
    nominal = float(f"{whole}.{frac or '0'}") * scale
    half = 0.5 * 10.0 ** -len(frac or "") * scale
    return nominal - half, nominal, nominal + half


def _published_inconsistencies(table: "Table") -> List[str]:
    profile = table.profiles.get("published") or next(iter(table.profiles.values()), None)
    if profile is None:
        return []
    found: List[str] = []
    if table.kind == "speed":
        base = next((r for r in profile.rows if r.name == table.baseline), None)
        base_tp = _float(base.published.values.get("throughput")) if base is not None else None
        for row in profile.rows:
            tp, speedup = _float(row.published.values.get("throughput")), _float(row.published.values.get("speedup"))
            if tp is None or speedup is None or base_tp is None or base_tp <= 5e-4:
                continue
            # Every printed figure is rounded to 3 decimals: accept anything the exact values could have given.
            low = (tp - 5e-4) / (base_tp + 5e-4) - 5e-4
            high = (tp + 5e-4) / (base_tp - 5e-4) + 5e-4
            if not low - 1e-9 <= speedup <= high + 1e-9:
                found.append(
                    f"{table.name} {row.name}: published speedup {speedup:.3f}x, but published throughput "
                    f"{tp:.3f} / baseline {table.baseline} {base_tp:.3f} = {tp / base_tp:.3f}x"
                    + (f" (config note: {row.note})" if row.note else "")
                )
    if table.kind == "memory":
        extra = profile.settings.extra
        width, copies = float(extra.get("bytes_per_parameter", 4)), float(extra.get("parameter_copies", 3))
        for row in profile.rows:
            memory = _float(row.published.values.get("model_memory_gb"))
            params = row.published.values.get("parameters")
            interval = _count_interval(params)
            if memory is None or interval is None:
                continue
            low, nominal, high = (p * width * copies / 2**30 for p in interval)
            if max(low - memory, memory - high) > 0.01:
                found.append(
                    f"{table.name} {row.name}: published Total Model Parameter Memory {memory:.2f}GB, but "
                    f"{params} parameters × {width:g} bytes × {copies:g} = {nominal:.2f} GiB"
                    + (f" (config note: {row.note})" if row.note else "")
                )
    return found


def _flag(table: "Table", ratio: float) -> str:
    tol = table.tolerance
    if ratio < 1 - tol:
        return "regression" if table.higher_is_better else "better"
    if ratio > 1 + tol:
        return "better" if table.higher_is_better else "regression"
    return "ok"


def _compare_row(
    table: "Table", profile: "Profile", group: _Group, row: "Row", engine: str, result: Optional[Result]
) -> Dict[str, Any]:
    values = row.published.values
    speed = table.kind == "speed"
    ideal = _ideal(row) if _on_row_devices(row, result) else None
    entry: Dict[str, Any] = {
        "experiment": row.name,
        "engine": engine,
        "profile": group.profile,
        "hardware": group.hardware,
        "status": result.status if result is not None else None,
        "ours": result.value if result is not None and result.status == "ok" else None,
        "published": _published_value(table, row),
        "speedup": None,
        "published_speedup": None,
        "ratio": None,
        "micro_batches": perf.effective_microbatches(row.batch, row.chunks) if row.mode == "pipeline" else None,
        "ideal": ideal,
        "of_ideal": None,
        "published_of_ideal": None,
        "spread": None,
        "flag": "ok",
        "note": "",
    }
    if speed:
        entry["published_speedup"] = _float(values.get("speedup"))
        entry["speedup"] = _speedup(table, profile, group, result)
        if ideal is not None:
            if entry["speedup"] is not None:
                entry["of_ideal"] = entry["speedup"] / ideal
            if entry["published_speedup"] is not None:
                entry["published_of_ideal"] = entry["published_speedup"] / ideal
    if result is not None and result.value and result.spread.get("std") is not None:
        entry["spread"] = result.spread["std"] / result.value
    extra_note = _parameter_note(table, row, result)

    if result is None:
        entry.update(flag="missing", note="no result")
    elif result.status == "oom":
        nothing_published = entry["published"] is None or str(values.get("status", "")).lower() == "out of memory"
        entry.update(
            flag="ok" if nothing_published else "regression",
            note="out of memory, as published" if nothing_published else "out of memory",
        )
    elif result.status == "predicted" and _float(result.extra.get("predicted_gib")) is not None:
        # A prediction is not a measurement: it is shown against the published figure, never a regression.
        predicted = float(result.extra["predicted_gib"])
        theirs = entry["published"]
        entry["ours"] = predicted
        if theirs:
            entry["ratio"] = predicted / theirs
            entry["flag"] = "ok" if _flag(table, entry["ratio"]) == "ok" else "differs"
            entry["note"] = (
                f"predicted (not measured) {predicted:.2f} {table.unit} vs published {theirs:.2f} "
                f"{table.unit} (ratio {entry['ratio']:.3f})"
            )
        else:
            entry["note"] = f"predicted (not measured) {predicted:.2f} {table.unit}; nothing published to compare"
    elif result.status != "ok" or result.value is None:
        entry.update(flag="missing", note=f"run {result.status}")
    else:
        ours, theirs = (entry["speedup"], entry["published_speedup"]) if speed else (entry["ours"], entry["published"])
        if ours is None and speed:
            entry.update(flag="missing", note=f"no result for the baseline {table.baseline} on this hardware")
        elif theirs is None or ours is None or theirs == 0:
            entry.update(flag="ok", note="nothing published to compare")
        else:
            entry["ratio"] = ours / theirs
            entry["flag"] = _flag(table, entry["ratio"])
            what = "speedup" if speed else table.metric
            digits = 3 if speed else 2
            unit = "x" if speed else f" {table.unit}"
            entry["note"] = (
                f"{what} {ours:.{digits}f}{unit} vs published {theirs:.{digits}f}{unit} "
                f"(ratio {entry['ratio']:.3f}, tolerance ±{table.tolerance:.0%})"
            )
    if group.profile != "published" and entry["flag"] in ("regression", "better"):
        # Scaled-down rows on other hardware cannot regress against the published figures:
        # report the difference, never fail `compare --check` on it.
        entry["flag"] = "differs"
        entry["note"] += f" ({group.profile} profile: not comparable with the published hardware)"
    if extra_note:
        entry["note"] = f"{entry['note']}; {extra_note}" if entry["note"] else extra_note
    return entry


def _parameter_note(table: "Table", row: "Row", result: Optional[Result]) -> str:
    """Our parameter count and model memory against the published ones (memory tables)."""
    if table.kind != "memory" or result is None:
        return ""
    notes = []
    ours, interval = result.extra.get("parameters"), _count_interval(row.published.values.get("parameters"))
    if isinstance(ours, int) and interval is not None and not interval[0] <= ours <= interval[2]:
        notes.append(f"our model has {ours:,} parameters, published {row.published.values.get('parameters')}")
    memory, published = (
        _float(result.extra.get("model_memory_gib")),
        _float(row.published.values.get("model_memory_gb")),
    )
    if memory is not None and published is not None and abs(memory - published) > 0.005 + 1e-9:
        notes.append(f"model memory {memory:.2f} GiB by the column's rule, published {published:.2f}GB")
    return "; ".join(notes)


def _describe(table: "Table", entry: Mapping[str, Any]) -> str:
    line = f"{table.name} {_label(entry['experiment'], entry['engine'])} [{entry['flag']}]"
    if entry["hardware"] is not None:
        line += f" on {entry['hardware']} ({entry['profile']} profile)"
    return f"{line}: {entry['note']}"


def compare(table: "Table", results: Sequence[Result], *, fmt: str = "rst") -> Comparison:
    """Row by row against the published figures; see the module docstring."""
    entries: List[Dict[str, Any]] = []

    def block(profile: "Profile", group: _Group) -> str:
        group_entries = [
            _compare_row(table, profile, group, row, engine, result)
            for row, engine, result in _row_slots(profile, group)
        ]
        entries.extend(group_entries)
        return f"{_heading(table, group)}\n\n{_compare_grid(table, group_entries, fmt)}"

    blocks = _for_groups(table, results, block)

    regressions = [_describe(table, e) for e in entries if e["flag"] == "regression"]
    inconsistencies = _published_inconsistencies(table)
    flagged = [_describe(table, e) for e in entries if e["flag"] != "ok"]
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
    return Comparison(rows=entries, regressions=regressions, inconsistencies=inconsistencies, text=_join(blocks))


def _compare_grid(table: "Table", entries: Sequence[Mapping[str, Any]], fmt: str) -> str:
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
            _label(e["experiment"], e["engine"]),
            _num(e["ours"], digits)
            if e["status"] in (None, "ok")
            else f"{_num(e['ours'], digits)} (predicted)"
            if e["status"] == "predicted"
            else str(e["status"]),
            _num(e["published"], digits),
        ]
        if speed:
            ideal = e["ideal"]
            cells += [
                _DASH if e["spread"] is None else f"±{100 * e['spread']:.1f}%",
                _num(e["speedup"], 3, "x"),
                _num(e["published_speedup"], 3, "x"),
                _num(e["ratio"], 3),
                _DASH if ideal is None or e["of_ideal"] is None else f"{e['of_ideal']:.2f} of {ideal:.2f}x",
                _DASH
                if ideal is None or e["published_of_ideal"] is None
                else f"{e['published_of_ideal']:.2f} of {ideal:.2f}x",
            ]
        else:
            cells += [_num(e["ratio"], 3)]
        cells.append(e["flag"])
        rows.append(cells)
    return _grid(headers, rows, ["left"] + ["right"] * (len(headers) - 2) + ["left"], fmt)
