"""Tests of gpipe_bench.pipe.schedule: the fill-drain clocks, exhaustively for m, n in 1..8."""

from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Tuple

import pytest

from gpipe_bench.pipe.schedule import Cell, Step, backward_steps, clock_cycles, forward_steps

SIZES = list(itertools.product(range(1, 9), range(1, 9)))


def _where(clocks: List[List[Step]]) -> Dict[Tuple[str, int, int], Tuple[int, int]]:
    """(kind, i, j) -> (clock, position in the flattened order); every step must be unique."""
    where: Dict[Tuple[str, int, int], Tuple[int, int]] = {}
    position = 0
    for clock, steps in enumerate(clocks):
        for step in steps:
            key = (step.kind, step.i, step.j)
            assert key not in where, f"{key} appears twice"
            where[key] = (clock, position)
            position += 1
    return where


def test_doc_example() -> None:
    assert clock_cycles(2, 2) == [[Cell(0, 0)], [Cell(1, 0), Cell(0, 1)], [Cell(1, 1)]]


@pytest.mark.parametrize("m,n", SIZES)
def test_clock_cycles_every_cell_once_at_clock_i_plus_j(m: int, n: int) -> None:
    clocks = clock_cycles(m, n)
    assert len(clocks) == m + n - 1
    seen = set()
    for k, cells in enumerate(clocks):
        assert cells, f"clock {k} is empty"
        assert len({c.j for c in cells}) == len(cells), "one cell per partition per clock"
        for cell in cells:
            assert isinstance(cell, Cell)
            assert 0 <= cell.i < m and 0 <= cell.j < n
            assert cell.i + cell.j == k
            assert cell not in seen
            seen.add(cell)
    assert seen == {Cell(i, j) for i in range(m) for j in range(n)}


def test_clock_cycles_rejects_negative() -> None:
    with pytest.raises(ValueError):
        clock_cycles(-1, 2)
    with pytest.raises(ValueError):
        clock_cycles(2, -1)


@pytest.mark.parametrize("m,n", SIZES)
def test_forward_steps(m: int, n: int) -> None:
    steps = forward_steps(m, n)
    assert [[(s.i, s.j) for s in clock] for clock in steps] == [
        [(c.i, c.j) for c in cells] for cells in clock_cycles(m, n)
    ]
    assert all(s.kind == "forward" for clock in steps for s in clock)


CHECKPOINTS: List[Tuple[str, Callable[[int], Callable[[int], bool]]]] = [
    ("always", lambda m: lambda i: True),
    ("except_last", lambda m: lambda i: i < m - 1),
    ("never", lambda m: lambda i: False),
    ("odd", lambda m: lambda i: i % 2 == 1),
]


@pytest.mark.parametrize("mode", [name for name, _ in CHECKPOINTS])
@pytest.mark.parametrize("m,n", SIZES)
def test_backward_steps(m: int, n: int, mode: str) -> None:
    checkpointed = dict(CHECKPOINTS)[mode](m)
    clocks = backward_steps(m, n, checkpointed)
    assert len(clocks) == m + n - 1
    where = _where(clocks)
    last = m + n - 2

    kinds = {key[0] for key in where}
    assert kinds <= {"backward", "recompute"}

    backward_keys = {k for k in where if k[0] == "backward"}
    assert backward_keys == {("backward", i, j) for i in range(m) for j in range(n)}

    recompute_keys = {k for k in where if k[0] == "recompute"}
    assert recompute_keys == {("recompute", i, j) for i in range(m) if checkpointed(i) for j in range(n)}

    for i in range(m):
        for j in range(n):
            clock, pos = where[("backward", i, j)]
            # Mirror of the forward: reverse clock order.
            assert clock == last - (i + j)
            if j < n - 1:
                # The gradient of (i, j) comes from (i, j+1): an earlier clock.
                next_clock, next_pos = where[("backward", i, j + 1)]
                assert next_clock < clock and next_pos < pos
            if checkpointed(i):
                rclock, rpos = where[("recompute", i, j)]
                assert rpos < pos, "recompute must come before its backward"
                if j < n - 1:
                    # One clock early: in the clock of backward(i, j+1), while that runs.
                    assert rclock == clock - 1
                    assert rclock == where[("backward", i, j + 1)][0]
                else:
                    # The last partition has no successor to wait for: same clock, just before.
                    assert rclock == clock

    # A clock holds at most one backward per partition, and a recompute shares its
    # partition's clock only with a backward placed before it (memory freed first).
    for steps in clocks:
        per_partition: Dict[int, List[Step]] = {}
        for s in steps:
            per_partition.setdefault(s.j, []).append(s)
        for j, ss in per_partition.items():
            assert sum(s.kind == "backward" for s in ss) <= 1
            assert sum(s.kind == "recompute" for s in ss) <= 1
            if len(ss) == 2 and j < n - 1:
                assert [s.kind for s in ss] == ["backward", "recompute"]


@pytest.mark.parametrize("m,n", [(1, 1), (3, 1), (1, 3), (4, 3)])
def test_backward_steps_without_checkpoint_mirror_forward(m: int, n: int) -> None:
    clocks = backward_steps(m, n, lambda i: False)
    assert [[(s.i, s.j) for s in c] for c in clocks] == [
        [(c.i, c.j) for c in cells] for cells in clock_cycles(m, n)[::-1]
    ]


def test_backward_steps_small_example() -> None:
    clocks = backward_steps(2, 2, lambda i: True)
    assert clocks == [
        [Step("recompute", 1, 1), Step("backward", 1, 1), Step("recompute", 1, 0)],
        [Step("backward", 1, 0), Step("recompute", 0, 1), Step("backward", 0, 1), Step("recompute", 0, 0)],
        [Step("backward", 0, 0)],
    ]
