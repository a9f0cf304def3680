"""Cells and grids: how figures are written in every table (one place for numbers, dashes and units)."""

from __future__ import annotations

import importlib
import math
import statistics
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple, cast

from gpipe_bench.results import Result

if TYPE_CHECKING:  # config imports models; rendering needs only the attributes
    from gpipe_bench.config import Row, Table


# tabulate ships no type information; one typed handle keeps mypy --strict meaningful here.
tabulate = cast(Callable[..., str], importlib.import_module("tabulate").tabulate)


DASH = "–"


FORMATS = {"rst": "rst", "md": "github"}


# Published values are keyed by what the source printed; the table's metric may be spelled differently.
PUBLISHED_KEY = {"peak_activation_memory": "peak_activation_gb"}


def render_grid(headers: Sequence[str], rows: Sequence[Sequence[str]], aligns: Sequence[str], fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; use one of {', '.join(FORMATS)}")
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


def fmt_num(value: Any, digits: int, suffix: str = "") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}{suffix}"
    return DASH


def status_cell(result: Optional[Result], ok: Callable[[float], str]) -> str:
    if result is None:
        return DASH
    if result.status == "oom":
        return "Out of memory"
    if result.status != "ok":
        return result.status
    return ok(result.value) if result.value is not None else "--"


def as_float(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def published_value(table: "Table", row: "Row") -> Optional[float]:
    values = row.published.values
    return as_float(values.get(table.metric, values.get(PUBLISHED_KEY.get(table.metric, table.metric))))


def join_blocks(blocks: List[str]) -> str:
    return "\n\n".join(b for b in blocks if b) + "\n"


def abbrev(count: Any) -> str:
    if not isinstance(count, int) or isinstance(count, bool):
        return DASH
    if count >= 1e9:
        return f"{count / 1e9:.2f}B"
    if count >= 1e7:
        return f"{count / 1e6:.0f}M"  # the published rounding: 90M, 358M
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.0f}K"


def lf_label(table: "Table", row: "Row") -> str:
    args = {**dict(table.model_args), **dict(row.model_args)}
    if "num_layers" in args and "num_filters" in args:
        return f"({args['num_layers']}, {args['num_filters']})"
    return DASH


def format_gib(gib: Any) -> str:
    """A memory figure in GiB, or in MiB below 1 GiB (the quick profile's figures are small): units always shown."""
    value = as_float(gib)
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:.2f} GiB" if abs(value) >= 1 else f"{value * 1024:.1f} MiB"


def format_bytes(nbytes: Any) -> str:
    """A memory figure given in bytes, as :func:`format_gib` shows it."""
    value = as_float(nbytes)
    return format_gib(value / (1 << 30) if value is not None else None)


def memory_cell(result: Optional[Result]) -> str:
    if result is not None and result.status == "predicted":
        return "not measured"
    return status_cell(result, format_gib)


def mean_std(result: Result) -> str:
    """``mean±std`` of a result's samples (seeds), two decimals."""
    if result.samples:
        mean, std, _ = seed_stats(result)
        return f"{mean:.2f}±{std:.2f}"
    return f"{result.value:.2f}" if result.value is not None else "--"


def seed_stats(result: Result) -> Tuple[float, float, int]:
    samples = [float(v) for v in result.samples]
    std = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return statistics.fmean(samples), std, len(samples)
