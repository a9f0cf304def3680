"""The host allocator policy every measuring command applies to every row alike, and records.

Why: glibc hands large freed blocks back to the operating system (its
``mmap`` and trim thresholds), and the next training step then pays a page
fault for every page it touches afresh. How much a step faults depends on
how much memory it holds at once: a fill-drain pipeline holds every
micro-batch's activations, the plain model one batch's, a layer timed alone
one layer's. Left at glibc's defaults, rows would differ by how much memory
they fault in, and a prediction from layers timed alone would miss it; here
our engine on one CPU worker ran 0.87x plain gradient accumulation with the
defaults and 0.97x with the thresholds fixed.

``steady`` fixes both thresholds so freed memory stays in the process (what
PyTorch's CPU performance guide gets by preloading jemalloc or tcmalloc);
``default`` leaves glibc as configured. The policy is process-wide, so it is
set once, before any row runs, and :func:`current` goes into every record's
environment. Library users get the same with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` in the
environment of the Python process (glibc reads them at start-up).
"""

from __future__ import annotations

import ctypes
from typing import Optional

__all__ = ["POLICIES", "apply", "current"]

POLICIES = ("steady", "default")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP = 32 << 20  # glibc's largest dynamic mmap threshold on 64-bit hosts
_TRIM = 1 << 30

_current: Optional[str] = None


def apply(policy: str) -> str:
    """Set the policy for this process; return what was set, in words (also :func:`current` from now on)."""
    global _current
    if policy not in POLICIES:
        raise ValueError(f"unknown host allocator policy {policy!r}; use one of {', '.join(POLICIES)}")
    if policy == "default":
        _current = "default (glibc as configured)"
        return _current
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM)
    except (OSError, AttributeError):
        ok = 0
    if not ok:
        _current = "default (mallopt unavailable: not glibc)"
    else:
        _current = "steady: glibc mmap threshold 32 MiB, trim threshold 1 GiB"
    return _current


def current() -> str:
    """The policy this process runs under, in words ('not set' when no command set one)."""
    return _current or "not set (glibc as configured)"
