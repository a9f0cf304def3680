"""The published data checked against itself: a slip in the source is flagged, never silently "reproduced".

Speedups against throughputs (within the printed rounding), model memory
against parameter counts by the column's rule.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from gpipe_bench.config import MemorySettings

from .format import as_float

if TYPE_CHECKING:  # config imports models; rendering needs only the attributes
    from gpipe_bench.config import Table


_COUNT = re.compile(r"^\s*([0-9]+)(?:\.([0-9]+))?\s*([KMBT]?)\s*$", re.IGNORECASE)


_SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def count_interval(value: Any) -> Optional[Tuple[float, float, float]]:
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


def published_inconsistencies(table: "Table") -> List[str]:
    profile = table.profiles.get("published") or next(iter(table.profiles.values()), None)
    if profile is None:
        return []
    found: List[str] = []
    if table.kind == "speed":
        base = next((r for r in profile.rows if r.name == table.baseline), None)
        base_tp = as_float(base.published.values.get("throughput")) if base is not None else None
        for row in profile.rows:
            tp, speedup = (
                as_float(row.published.values.get("throughput")),
                as_float(row.published.values.get("speedup")),
            )
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
        own = MemorySettings.of(table, profile.settings)
        width, copies = own.bytes_per_parameter, own.parameter_copies
        for row in profile.rows:
            memory = as_float(row.published.values.get("model_memory_gb"))
            params = row.published.values.get("parameters")
            interval = count_interval(params)
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
