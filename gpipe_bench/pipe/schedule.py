"""Which (micro-batch, partition) cell runs at each clock: pure functions.

GPipe's fill-drain schedule runs cell ``(i, j)`` (micro-batch ``i`` on partition
``j``) at clock ``i + j`` in the forward pass and in the mirrored order in the
backward pass. Keeping the schedule as data, separate from the threads that run
it, lets it be tested exhaustively and lets other schedules (1F1B) slot in later.

Recompute placement: the recompute of a checkpointed cell ``(i, j)`` is put one
clock *before* its backward, on the same worker, while partition ``j + 1`` is
still computing the gradient that ``(i, j)`` needs. That is what hides
recomputation behind the pipeline instead of adding it to the critical path.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple

__all__ = ["Cell", "Step", "clock_cycles", "forward_steps", "backward_steps"]


class Cell(NamedTuple):
    """Micro-batch ``i`` on partition ``j``."""

    i: int
    j: int


class Step(NamedTuple):
    """One unit of work: ``kind`` is ``'forward'``, ``'recompute'`` or ``'backward'``."""

    kind: str
    i: int
    j: int


def clock_cycles(m: int, n: int) -> List[List[Cell]]:
    """Cells of each forward clock for ``m`` micro-batches over ``n`` partitions.

    >>> clock_cycles(2, 2)
    [[Cell(i=0, j=0)], [Cell(i=1, j=0), Cell(i=0, j=1)], [Cell(i=1, j=1)]]
    """
    if m < 0 or n < 0:
        raise ValueError(f"m and n must not be negative (m={m}, n={n})")
    return [[Cell(k - j, j) for j in range(max(0, k - m + 1), min(k + 1, n))] for k in range(m + n - 1)]


def forward_steps(m: int, n: int) -> List[List[Step]]:
    """Forward steps per clock."""
    return [[Step("forward", c.i, c.j) for c in cells] for cells in clock_cycles(m, n)]


def backward_steps(m: int, n: int, checkpointed: Callable[[int], bool]) -> List[List[Step]]:
    """Backward steps per clock: the forward clocks reversed, recomputes one clock early.

    ``checkpointed(i)`` says whether micro-batch ``i`` was checkpointed (and so
    needs recomputing before its backward). Within a clock, a backward comes
    before the recompute that shares its worker, so activations are freed
    before new ones are made.
    """
    clocks = clock_cycles(m, n)[::-1]
    last = m + n - 2
    steps: List[List[Step]] = [[] for _ in clocks]
    for c, cells in enumerate(clocks):
        for cell in cells:
            if checkpointed(cell.i) and cell.j == n - 1:
                steps[c].append(Step("recompute", cell.i, cell.j))
            steps[c].append(Step("backward", cell.i, cell.j))
    for i in range(m):
        if not checkpointed(i):
            continue
        for j in range(n - 1):
            c = last - (i + j)
            steps[c - 1].append(Step("recompute", i, j))
    return steps
