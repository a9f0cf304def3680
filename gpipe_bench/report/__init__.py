"""Tables of saved results in the published layout, and the comparison with the published numbers.

Rendering is a separate step over saved :class:`~gpipe_bench.results.Result`
records, so any set of results (one row re-run today, the rest last week) can
be shown together.

- :mod:`.groups`: results by profile and machine, speedups within a group;
- :mod:`.format`: cells and grids;
- :mod:`.tables`: the speed, memory and accuracy tables (:func:`render`);
- :mod:`.compare`: ours against the published figures, typed rows and flags;
- :mod:`.audit`: the published data checked against itself.
"""

from .compare import CompareRow, Comparison, compare
from .format import format_gib, mean_std
from .tables import memory_per_device, render, speed_table, transparency

__all__ = [
    "Comparison",
    "CompareRow",
    "speed_table",
    "render",
    "compare",
    "format_gib",
    "memory_per_device",
    "transparency",
    "mean_std",
]
