"""Timelines of one training step: what ran where and when, measured or simulated.

A measured step and a simulated one are the same data type, written by the
same functions, so that they can be compared. The package is split in three
because the simulator (:mod:`gpipe_bench.predict.simulate`) needs only the
first:

- :mod:`~gpipe_bench.timeline.model`: :data:`PHASES`, :class:`Span`,
  :class:`Timeline` (standard library only);
- :mod:`~gpipe_bench.timeline.files`: the writers (a Chrome trace JSON, a PNG)
  and the paths ``--timeline PATH`` names;
- :mod:`~gpipe_bench.timeline.recorder`: :class:`TimelineRecorder`, a step of
  our engine recorded through its hook (torch, CUDA events).

The model is imported here; the writers and the recorder are imported on first
access to one of their names (``gpipe_bench.timeline.write``), so that
importing the package or its model does not import torch, the engine's hook
or the writers. A name loaded that way is looked up in its module each time:
patch it there (``gpipe_bench.timeline.files.write``), where it is called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

from gpipe_bench.timeline.model import PHASES, Span, Timeline

if TYPE_CHECKING:
    from gpipe_bench.timeline.files import check_writable, paths, row_path, write, write_chrome_trace, write_png
    from gpipe_bench.timeline.recorder import TimelineRecorder

__all__ = [
    "PHASES",
    "Span",
    "Timeline",
    "TimelineRecorder",
    "check_writable",
    "paths",
    "row_path",
    "write",
    "write_chrome_trace",
    "write_png",
]

#: The names imported on first access, and the submodule each comes from.
_LAZY = {
    "TimelineRecorder": "recorder",
    "check_writable": "files",
    "paths": "files",
    "row_path": "files",
    "write": "files",
    "write_chrome_trace": "files",
    "write_png": "files",
}


def __getattr__(name: str) -> Any:
    submodule = _LAZY.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{submodule}"), name)


def __dir__() -> List[str]:
    return sorted({*globals(), *__all__})
