"""The data model of a timeline: spans of work per lane, measured or simulated.

Why one data type for both: a measured step (recorded through the engine's
hook, :mod:`gpipe_bench.timeline.recorder`) and a simulated one (from
:mod:`gpipe_bench.predict.simulate`) are only comparable if they are drawn the
same way. Both become a :class:`Timeline`, a list of :class:`Span` per lane (a
device, a link, the host), and both are written by the same functions
(:mod:`gpipe_bench.timeline.files`).

Why a module of its own: the simulator needs these types and nothing else, so
this module imports the standard library only (no torch, no engine, no
writers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

__all__ = ["PHASES", "Span", "Timeline"]

#: What a span did: a cell's forward, its recompute, its backward, a copy between devices,
#: or other work of the step (the loss, the optimizer) on the caller's thread.
PHASES = ("forward", "recompute", "backward", "copy", "other")


@dataclass(frozen=True)
class Span:
    """One piece of work: on ``lane``, micro-batch ``micro_batch`` of partition ``partition``."""

    lane: str  # 'cpu:0', 'cuda:1', 'link cuda:0->cuda:1', 'host', ...
    phase: str  # one of PHASES
    micro_batch: int  # -1 when the span is not a micro-batch's (the loss, the optimizer step)
    partition: int  # -1 when the span is not a partition's
    start: float  # seconds from the start of the step
    end: float
    label: str = ""  # what a span that is not a micro-batch's was ('loss', 'optimizer'); shown as its name

    @property
    def name(self) -> str:
        """The span's short name: phase initial and micro-batch (``F3``, ``R3``, ``B3``), else its label or phase."""
        if self.micro_batch >= 0:
            return f"{self.phase[:1].upper()}{self.micro_batch}"
        return self.label or self.phase

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    """The spans of one step, the lanes in display order, and what the step was."""

    title: str
    spans: List[Span]
    lanes: List[str] = field(default_factory=list)
    source: str = "measured"  # 'measured' or 'simulated'
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.lanes:
            self.lanes = list(dict.fromkeys(s.lane for s in self.spans))

    @property
    def duration(self) -> float:
        """From the earliest start to the latest end (0 for an empty timeline)."""
        if not self.spans:
            return 0.0
        return max(s.end for s in self.spans) - min(s.start for s in self.spans)

    def busy(self, lane: str) -> float:
        """Seconds ``lane`` was doing something (overlapping spans counted once)."""
        return _union([s for s in self.spans if s.lane == lane])

    def utilisation(self, lanes: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """Busy time / step duration per lane."""
        total = self.duration
        return {lane: (self.busy(lane) / total if total > 0 else 0.0) for lane in (lanes or self.lanes)}


def _union(spans: Sequence[Span]) -> float:
    busy, reach = 0.0, float("-inf")
    for s in sorted(spans, key=lambda s: s.start):
        if s.end <= reach:
            continue
        busy += s.end - max(s.start, reach)
        reach = s.end
    return busy
