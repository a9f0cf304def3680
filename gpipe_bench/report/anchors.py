"""``gpipe-bench anchors``: each public figure beside its prediction, and a summary of what is missed.

Why in the report layer: :mod:`gpipe_bench.predict.anchors` returns figures; how
they are shown (the ratio, the status, the sources under the table) is
rendering, as for every other table.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, List, Sequence

from .format import DASH, render_grid

if TYPE_CHECKING:
    from gpipe_bench.predict.anchors import Checked

__all__ = ["render"]


def _figure(value: float, what: str) -> str:
    return f"{value:.3f}x" if what == "speedup" else f"{value:.1f}"


def render(checked: Sequence["Checked"], fmt: str = "rst") -> str:
    """The anchors in ``fmt`` ('rst', 'md' or 'json'); below the table, the open misses and each source."""
    from gpipe_bench.predict.anchors import as_records

    if fmt == "json":
        return json.dumps(as_records(checked), indent=2)
    headers = ["Anchor", "GPU", "Model", "Batch", "Precision", "Figure", "Published", "Predicted", "Ratio", "Status"]
    rows = []
    for c in checked:
        rows.append(
            [
                c.name,
                c.gpu.split(",")[0],
                c.model,
                str(c.batch),
                c.precision,
                c.what,
                _figure(c.published, c.what),
                _figure(c.predicted, c.what) if c.predicted is not None else DASH,
                f"{c.ratio:.3f}" if c.ratio is not None else DASH,
                f"{c.status} (±{c.tolerance:.0%})",
            ]
        )
    aligns = ["left", "left", "left", "right", "left", "left", "right", "right", "right", "left"]
    lines: List[str] = [render_grid(headers, rows, aligns, fmt), ""]
    predicted = [c for c in checked if c.within is not None]
    inside = sum(1 for c in predicted if c.within)
    lines.append(f"{inside} of {len(predicted)} predicted anchors within their tolerance, with no calibration")
    lines.append("(the speedups of a published table use its one calibration, as `gpipe-bench predict` does).")
    for c in checked:
        if c.open and not c.within:
            lines.append(f"open: {c.name} {c.what}: {c.open}")
    lines.append("")
    lines.append("Sources:")
    seen = set()
    for c in checked:
        if c.source not in seen:
            seen.add(c.source)
            lines.append(f"  {c.name}: {c.source}")
    return "\n".join(lines)
