"""The block partition is exact: checked against brute force and an independent method."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, List, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpipe_bench.pipe.balance.partition import block_cost, block_costs, bottleneck, solve, solve_blocks


def brute_force(costs: Sequence[int], partitions: int) -> int:
    """The optimal bottleneck over every way to place partitions - 1 cuts."""
    n = len(costs)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), partitions - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = min(best, worst)
    return int(best)


def check_shape(sizes: List[int], n: int, partitions: int) -> None:
    assert len(sizes) == partitions
    assert all(isinstance(s, int) and s >= 1 for s in sizes)
    assert sum(sizes) == n


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[int], int]:
    # Small values make ties and zero-cost runs common, where a wrong
    # tie-break or crossing search would show.
    costs = draw(st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=10))
    partitions = draw(st.integers(min_value=1, max_value=len(costs)))
    return costs, partitions


@settings(max_examples=300, deadline=None)
@given(problems())
def test_matches_brute_force(problem: tuple[list[int], int]) -> None:
    costs, partitions = problem
    sizes = solve(costs, partitions)
    check_shape(sizes, len(costs), partitions)
    assert bottleneck(costs, sizes) == brute_force(costs, partitions)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=9), st.data())
def test_matches_brute_force_wide_range(costs: list[int], data: st.DataObject) -> None:
    partitions = data.draw(st.integers(min_value=1, max_value=len(costs)))
    sizes = solve(costs, partitions)
    check_shape(sizes, len(costs), partitions)
    assert bottleneck(costs, sizes) == brute_force(costs, partitions)


def test_one_partition_takes_everything() -> None:
    assert solve([3, 1, 4, 1, 5], 1) == [5]


def test_as_many_partitions_as_layers() -> None:
    assert solve([3, 1, 4, 1, 5], 5) == [1, 1, 1, 1, 1]


def test_single_layer() -> None:
    assert solve([7], 1) == [1]


def test_all_zero_costs() -> None:
    sizes = solve([0] * 6, 3)
    check_shape(sizes, 6, 3)


def test_zeros_around_a_heavy_cost() -> None:
    costs = [0, 0, 9, 0, 0, 1]
    sizes = solve(costs, 3)
    check_shape(sizes, 6, 3)
    assert bottleneck(costs, sizes) == 9


def test_heavy_cost_is_isolated() -> None:
    assert solve([1, 1, 100, 1, 1], 3) == [2, 1, 2]


def test_float_costs() -> None:
    costs = [0.5, 0.25, 2.0, 0.75, 0.5]
    sizes = solve(costs, 2)
    check_shape(sizes, 5, 2)
    assert bottleneck(costs, sizes) == 2.75


def test_deterministic() -> None:
    costs = [1, 2, 1, 2, 1, 2, 1, 2]
    assert solve(costs, 4) == solve(list(costs), 4)


@pytest.mark.parametrize("partitions", [0, -1, 6])
def test_partitions_out_of_range(partitions: int) -> None:
    with pytest.raises(ValueError, match=rf"between 1 and the number of layers \(5\), got {partitions}"):
        solve([1, 2, 3, 4, 5], partitions)


def test_empty_costs() -> None:
    with pytest.raises(ValueError, match=r"number of layers \(0\)"):
        solve([], 1)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_invalid_costs(bad: float) -> None:
    with pytest.raises(ValueError, match="finite and non-negative"):
        solve([1.0, bad, 2.0], 2)


def optimal_by_search(costs: Sequence[int], partitions: int) -> int:
    """Independent exact method for long sequences: binary search on the answer.

    A bottleneck B is feasible iff greedily filling blocks up to B needs at most
    `partitions` blocks (with at least that many costs, extra cuts never hurt).
    """

    def blocks_needed(limit: int) -> int:
        count, running = 1, 0
        for c in costs:
            if running + c > limit:
                count, running = count + 1, c
            else:
                running += c
        return count

    lo, hi = max(costs), sum(costs)
    while lo < hi:
        mid = (lo + hi) // 2
        if blocks_needed(mid) <= partitions:
            hi = mid
        else:
            lo = mid + 1
    return lo


def test_large_sequence_is_optimal() -> None:
    # The size of AmoebaNet-D(36, ...) flattened: 1525 layers into 8 partitions.
    rng = random.Random(0)
    costs = [rng.randint(0, 10**6) for _ in range(1525)]
    sizes = solve(costs, 8)
    check_shape(sizes, 1525, 8)
    assert bottleneck(costs, sizes) == optimal_by_search(costs, 8)


@pytest.mark.parametrize("partitions", [1, 2, 7, 50])
def test_medium_sequences_with_skewed_costs(partitions: int) -> None:
    rng = random.Random(partitions)
    # Mostly cheap layers with a few expensive ones, like real networks.
    costs = [rng.choice([0, 1, 2, 3, 500]) for _ in range(200)]
    sizes = solve(costs, partitions)
    check_shape(sizes, 200, partitions)
    assert bottleneck(costs, sizes) == optimal_by_search(costs, partitions)


# -- blocks whose cost depends on where they are cut -------------------------------------------------------------


def brute_force_blocks(
    weights: Sequence[int], partitions: int, enter: Sequence[int], leave: Sequence[int], allowed: Any = None
) -> float:
    """The optimal largest block cost over every placement of the cuts, blocks not allowed left out."""
    n = len(weights)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), partitions - 1):
        bounds = (0, *cuts, n)
        if allowed is not None and not all(bool(allowed[a, b]) for a, b in zip(bounds, bounds[1:])):
            continue
        worst = max(sum(weights[a:b]) + enter[a] + leave[b] for a, b in zip(bounds, bounds[1:]))
        best = min(best, worst)
    return best


@st.composite
def block_problems(draw: st.DrawFn) -> tuple[list[int], int, list[int], list[int]]:
    weights = draw(st.lists(st.integers(min_value=-5, max_value=20), min_size=1, max_size=9))
    n = len(weights)
    partitions = draw(st.integers(min_value=1, max_value=n))
    enter = draw(st.lists(st.integers(min_value=0, max_value=15), min_size=n + 1, max_size=n + 1))
    leave = draw(st.lists(st.integers(min_value=0, max_value=15), min_size=n + 1, max_size=n + 1))
    return weights, partitions, enter, leave


@settings(max_examples=300, deadline=None)
@given(block_problems())
def test_solve_blocks_matches_brute_force_with_cut_costs(problem: tuple[list[int], int, list[int], list[int]]) -> None:
    weights, partitions, enter, leave = problem
    sizes = solve_blocks(weights, partitions, enter, leave)
    assert sizes is not None
    check_shape(sizes, len(weights), partitions)
    assert max(block_cost(weights, sizes, enter, leave)) == brute_force_blocks(weights, partitions, enter, leave)


@settings(max_examples=200, deadline=None)
@given(block_problems(), st.integers(min_value=0, max_value=60))
def test_solve_blocks_under_a_cap_matches_brute_force(
    problem: tuple[list[int], int, list[int], list[int]], cap: int
) -> None:
    """A second cost (memory) caps which blocks may be used; the optimum is over the allowed splits only."""
    weights, partitions, enter, leave = problem
    n = len(weights)
    rng = random.Random(cap)
    memory = [rng.randint(0, 20) for _ in range(n)]
    prefix = [0, *itertools.accumulate(memory)]
    allowed = torch.tensor([[s < e and prefix[e] - prefix[s] <= cap for e in range(n + 1)] for s in range(n + 1)])
    sizes = solve_blocks(weights, partitions, enter, leave, allowed)
    expected = brute_force_blocks(weights, partitions, enter, leave, allowed)
    if expected == math.inf:
        assert sizes is None
        return
    assert sizes is not None
    check_shape(sizes, n, partitions)
    bounds = [0, *itertools.accumulate(sizes)]
    assert all(prefix[b] - prefix[a] <= cap for a, b in zip(bounds, bounds[1:]))
    assert max(block_cost(weights, sizes, enter, leave)) == expected


def test_solve_blocks_without_cut_costs_is_the_plain_optimum() -> None:
    rng = random.Random(7)
    for _ in range(50):
        costs = [rng.randint(0, 30) for _ in range(rng.randint(1, 40))]
        k = rng.randint(1, len(costs))
        sizes = solve_blocks(costs, k)
        assert sizes is not None
        assert bottleneck(costs, sizes) == bottleneck(costs, solve(costs, k))


def test_solve_blocks_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="between 1 and"):
        solve_blocks([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="finite"):
        solve_blocks([1.0, math.nan], 1)


def test_the_block_cost_matrix_is_block_cost_for_every_block() -> None:
    """One definition of a block's cost: the matrix solve_blocks minimises (and a planner caps) agrees with block_cost."""
    rng = random.Random(7)
    weights = [rng.uniform(0, 5) for _ in range(9)]
    enter = [rng.uniform(0, 1) for _ in range(10)]
    leave = [rng.uniform(0, 1) for _ in range(10)]
    matrix = block_costs(weights, enter, leave)
    for s in range(10):
        for e in range(10):
            if s < e:
                [expected] = block_cost(weights[s:e], [e - s], enter[s:], [0.0] * (e - s) + [leave[e]])
                assert float(matrix[s, e]) == pytest.approx(expected)
            else:
                assert math.isinf(float(matrix[s, e]))
    with pytest.raises(ValueError, match="finite"):
        block_costs([1.0, math.nan])
