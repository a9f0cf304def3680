"""Predicted rows beside what was measured for them and what was published.

Why beside each other: a prediction is only worth reading next to the
figure it claims to foresee. Each predicted row shows its throughput,
speedup, bubble, busiest device and peak memory per device, then the
newest measured record of the same table, profile and hardware (speedups
within that machine's records, as everywhere), then the published figures.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

from gpipe_bench.results import DEFAULT_ENGINE, Result

from .format import DASH, fmt_num, format_bytes, render_grid
from .groups import Group, group_results, speedup_of

if TYPE_CHECKING:
    from gpipe_bench.predict.hardware import Hardware
    from gpipe_bench.predict.run import TablePrediction

__all__ = ["measured_for", "precision_words", "render", "as_records"]

#: What a precision other than fp32 means for a prediction, in the words every heading uses.
_PRECISION_WORDS = {
    "tf32": "tf32 (convolutions and matrix products in TF32)",
    "bf16": "bf16 (autocast: convolutions and matrix products in bf16, parameters in fp32)",
    "fp16": "fp16 (autocast: convolutions and matrix products in fp16, parameters in fp32)",
}


def precision_words(precision: str) -> str:
    """``precision`` as a heading says it ('' for fp32, PyTorch's defaults: headings leave it out)."""
    return _PRECISION_WORDS.get(precision, "")


def _measured_group(
    prediction: "TablePrediction", results: Sequence[Result], hardware: Optional[str]
) -> Optional[Group]:
    """The one machine whose records stand beside the prediction: the group of ``hardware`` (a key or a part of one).

    A key equal to ``hardware`` wins; otherwise the first key containing it, in the
    groups' order. One group for every column of a row, so a row's measured
    throughput and speedup always come from the same machine; and from the
    prediction's precision (an fp32 record never stands beside a bf16 prediction).
    """
    if hardware is None:
        return None
    matching = [
        group
        for group in group_results(prediction.table, results)
        if group.profile == prediction.profile
        and group.precision == prediction.precision
        and group.hardware is not None
        and hardware in group.hardware
    ]
    exact = [group for group in matching if group.hardware == hardware]
    chosen = exact or matching
    return chosen[0] if chosen else None


def measured_for(
    prediction: "TablePrediction", results: Sequence[Result], hardware: Optional[str]
) -> Dict[str, Result]:
    """The newest measured record of each row of the predicted table and profile on ``hardware``'s machine."""
    return _results_of(_measured_group(prediction, results, hardware))


def _results_of(group: Optional[Group]) -> Dict[str, Result]:
    """Our engine's record of each row in ``group`` (none without a group)."""
    if group is None:
        return {}
    return {experiment: result for (experiment, engine), result in group.results.items() if engine == DEFAULT_ENGINE}


def _measured_speedup(group: Optional[Group], prediction: "TablePrediction", name: str) -> Optional[float]:
    profile = prediction.table.profiles.get(prediction.profile)
    if group is None or profile is None:
        return None
    return speedup_of(prediction.table, profile, group, group.get(name, DEFAULT_ENGINE))


def _memory(per_device: Optional[List[int]]) -> str:
    if not per_device:
        return DASH
    return format_bytes(max(per_device))


def as_records(
    prediction: "TablePrediction", results: Sequence[Result], hardware: Optional[str]
) -> List[Dict[str, Any]]:
    """One object per row: the predicted figures, then the measured and published ones (None where absent)."""
    group = _measured_group(prediction, results, hardware)
    measured = _results_of(group)
    out = []
    for p in prediction.rows:
        row = p.job.row
        m = measured.get(row.name)
        published = row.published.values
        out.append(
            {
                "experiment": row.name,
                "throughput": p.throughput,
                "speedup": p.speedup,
                "step_seconds": p.outcome.seconds,
                "bubble": p.outcome.bubble,
                "busiest_utilisation": p.outcome.busiest,
                "peak_activation_bytes_per_device": p.memory,
                "predicted_reserved_bytes_per_device": p.reserved,
                "predicted_allocated_bytes_per_device": p.allocated,
                "predicted_reserved_gib": sum(p.reserved) / 2**30 if p.reserved is not None else None,
                "predicted_allocated_gib": sum(p.allocated) / 2**30 if p.allocated is not None else None,
                "devices": list(p.job.devices),
                "engine": p.job.record_engine,
                "batch": row.batch,
                "chunks": row.chunks,
                "balance": list(row.balance) if row.balance else None,
                "checkpoint": row.checkpoint,
                "measured_throughput": m.value if m is not None and m.status == "ok" else None,
                "measured_speedup": _measured_speedup(group, prediction, row.name),
                "published_throughput": published.get("throughput"),
                "published_speedup": published.get("speedup"),
                "costs": prediction.costs,
                "precision": p.job.row.precision,
            }
        )
    return out


def render(prediction: "TablePrediction", results: Sequence[Result], hardware: Optional[str], fmt: str = "rst") -> str:
    """The predicted table in ``fmt`` ('rst', 'md' or 'json')."""
    records = as_records(prediction, results, hardware)
    if fmt == "json":
        return json.dumps(records, indent=2)
    unit = prediction.table.unit
    headers = [
        "Experiment",
        "Predicted",
        "Speedup",
        "Bubble",
        "Busiest device",
        "Peak activation / device",
        "Reserved - model / device",
        "Measured",
        "Measured speedup",
        "Published speedup",
    ]
    rows = []
    for r in records:
        rows.append(
            [
                r["experiment"],
                f"{r['throughput']:.3f} {unit}",
                fmt_num(r["speedup"], 3, "x"),
                f"{100 * r['bubble']:.1f}%",
                f"{100 * r['busiest_utilisation']:.1f}%",
                _memory(r["peak_activation_bytes_per_device"]),
                _memory(r["predicted_reserved_bytes_per_device"]),
                fmt_num(r["measured_throughput"], 3),
                fmt_num(r["measured_speedup"], 3, "x"),
                fmt_num(r["published_speedup"], 3, "x"),
            ]
        )
    if not any(r["predicted_reserved_bytes_per_device"] for r in records):  # no GPU row: no allocator to model
        headers.remove("Reserved - model / device")
        rows = [cells[:6] + cells[7:] for cells in rows]
    grid = render_grid(headers, rows, ["left"] + ["right"] * (len(headers) - 1), fmt)
    words = precision_words(prediction.precision)
    return f"Precision: {words}\n\n{grid}" if words else grid


def _rate(value: Optional[float], unit: str) -> str:
    if value is None:
        return "–"
    return f"{value / 1e12:.1f} T{unit}" if value >= 1e12 else f"{value / 1e9:.0f} G{unit}"


def presets_table(presets: Mapping[str, "Hardware"]) -> str:
    """The hardware presets as a table a user reads (``gpipe-bench predict --hardware list``), with their sources."""
    headers = [
        "Name",
        "fp32",
        "Convolutions",
        "Mixed precision",
        "Memory bandwidth",
        "Memory",
        "Kernel launch",
        "Rates",
        "Between devices",
    ]
    rows = []
    for hw in presets.values():
        link = hw.link()
        between = "shared memory" if link.bandwidth == float("inf") else f"{link.kind} {_rate(link.bandwidth, 'B/s')}"
        rows.append(
            [
                hw.name,
                _rate(hw.fp32_flops, "FLOP/s"),
                ("TF32 " if hw.conv_flops() != hw.fp32_flops else "fp32 ") + _rate(hw.conv_flops(), "FLOP/s"),
                ("fp16/bf16 " if hw.bf16 else "fp16 ") + _rate(hw.half_flops, "FLOP/s") if hw.half_flops else "–",
                _rate(hw.memory_bandwidth, "B/s") + (f" x {hw.memory_share:.2f}" if hw.memory_share < 1 else ""),
                f"{hw.memory / (1 << 30):.0f} GiB",
                f"{hw.launch * 1e6:.0f} µs" if hw.launch else "–",
                ", ".join(sorted({r.name for r in hw.rates.values()})) or "roofline",
                between,
            ]
        )
    lines = [render_grid(headers, rows, ["left"] + ["right"] * (len(headers) - 1), "rst"), ""]
    for hw in presets.values():
        lines.append(f"{hw.name}: {hw.description}")
        lines += [f"    {source}" for source in hw.sources]
    named = {r.name: r for hw in presets.values() for r in hw.rates.values()}
    if named:
        lines += ["", "Measured rates (convolutions per filter and pass, matrix products):"]
        lines += [f"{name}: {rates.source}" for name, rates in named.items()]
    lines += ["", "Host time per operator beyond the kernel launch is measured where the prediction runs."]
    return "\n".join(lines)
