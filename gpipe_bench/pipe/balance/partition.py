"""Split a sequence of per-layer costs into contiguous blocks, optimally.

Why this module exists: both balancers reduce a model to one cost per layer and
then need a ``balance`` for :class:`GPipe`: ``k`` contiguous, non-empty blocks
of layers. A pipeline runs at the pace of its slowest (or fullest) stage, so
the objective is the *bottleneck*: minimise the largest block's total cost.

Why this approach: torchgpipe used a heuristic (Bárány et al.'s block moves)
that is not guaranteed optimal. The bottleneck problem has a small exact
dynamic programme, so there is no reason to settle for less:

    best[j][i] = min over s of max(best[j-1][s], P[i] - P[s])

where ``P`` are prefix sums and ``best[j][i]`` is the optimal bottleneck of the
first ``i`` costs cut into ``j`` blocks. With non-negative costs ``best[j-1][s]``
never decreases in ``s`` and the last block's cost ``P[i] - P[s]`` never
increases, so the inner minimum sits where the two curves cross. That crossing
is found by binary search instead of a scan, giving O(k·n·log n); the search
itself runs in C through :func:`bisect.bisect_left`, so 1,525 layers into 8
blocks takes milliseconds.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from itertools import accumulate
from typing import TYPE_CHECKING, List, Optional, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["solve", "bottleneck", "solve_blocks", "block_cost", "block_costs"]


def solve(costs: Sequence[float], partitions: int) -> List[int]:
    """Return block sizes (each >= 1, summing to ``len(costs)``) minimising the largest block cost.

    Exact for integer costs (what both profilers produce). For float costs it is
    exact up to rounding in the prefix sums.

    Several partitions often share the optimal bottleneck; ties are broken
    towards the later cut at every step, only so the answer is deterministic.
    """
    n = len(costs)
    if partitions < 1 or partitions > n:
        raise ValueError(f"partitions must be between 1 and the number of layers ({n}), got {partitions}")
    for index, cost in enumerate(costs):
        # Negative costs would break the monotonicity the binary search relies
        # on, and NaN/inf cannot be compared meaningfully; reject them up front.
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"costs must be finite and non-negative, got {cost!r} at index {index}")

    prefix: List[float] = list(accumulate(costs, initial=0))
    inf = math.inf

    # best[i]: optimal bottleneck of the first i costs in the current number of
    # blocks; +inf where no valid split exists. One block: the prefix sum itself.
    best: List[float] = [inf] + prefix[1:]
    # cuts[j][i]: where the last block starts in the optimum behind best[j][i]
    # (kept for j >= 2 only; index 0 stands for j == 2).
    cuts: List[List[int]] = []

    for j in range(2, partitions + 1):
        # key[s] = best[s] + P[s] is non-decreasing, and for exact arithmetic
        # "best[s] >= P[i] - P[s]" is the same as "key[s] >= P[i]". So the first
        # s where the previous bottleneck overtakes the last block is a bisect
        # of key for P[i], with no Python-level comparison loop.
        key = [b + p for b, p in zip(best, prefix)]
        new_best: List[float] = [inf] * (n + 1)
        cut = [0] * (n + 1)
        lo = j - 1  # the first j-1 blocks need at least j-1 costs
        # Leave at least one cost for each of the remaining partitions - j blocks.
        for i in range(j, n - (partitions - j) + 1):
            total = prefix[i]
            s = bisect_left(key, total, lo, i)
            # The optimum is at the crossing s or just before it. Both are
            # evaluated with an explicit max so float rounding in key cannot
            # pick a worse one.
            choice = -1
            value = inf
            if s < i:
                value = max(best[s], total - prefix[s])
                choice = s
            if s - 1 >= lo:
                before = max(best[s - 1], total - prefix[s - 1])
                if before < value:
                    value, choice = before, s - 1
            new_best[i] = value
            cut[i] = choice
        best = new_best
        cuts.append(cut)

    # Walk the recorded cuts back from the end to recover the block sizes.
    sizes: List[int] = []
    end = n
    for cut in reversed(cuts):
        start = cut[end]
        sizes.append(end - start)
        end = start
    sizes.append(end)
    sizes.reverse()
    return sizes


def bottleneck(costs: Sequence[float], sizes: Sequence[int]) -> float:
    """The largest block cost of ``costs`` split into consecutive blocks of ``sizes``."""
    largest: float = 0
    start = 0
    for size in sizes:
        largest = max(largest, sum(costs[start : start + size]))
        start += size
    return largest


def solve_blocks(
    weights: Sequence[float],
    partitions: int,
    enter: Optional[Sequence[float]] = None,
    leave: Optional[Sequence[float]] = None,
    allowed: Optional["torch.Tensor"] = None,
    host: Optional[Sequence[float]] = None,
) -> Optional[List[int]]:
    """Block sizes minimising the largest block cost, where a block's cost also depends on where it is cut.

    Block ``[s, e)`` costs ``sum(weights[s:e]) + enter[s] + leave[e]`` (``enter``
    and ``leave`` have ``len(weights) + 1`` entries): a pipeline stage pays for
    the activation it receives at its first cut and sends at its last, on top of
    its layers. With ``host`` (a second cost per layer, done alongside the
    first: a GPU's host issuing what its device runs) the layers cost
    ``max(sum(weights[s:e]), sum(host[s:e]))`` instead (:func:`block_costs`). Cut-dependent terms break the monotonicity :func:`solve` relies
    on, so this is the plain dynamic programme over every (start, end) pair,
    ``O(k·n²)``, run as ``k`` tensor operations on an ``(n+1)²`` matrix (370
    layers into 8 blocks: a few milliseconds).

    ``allowed``: an ``(n+1)²`` boolean matrix; blocks ``[s, e)`` where it is
    False are never used (a memory cap). Returns None when no split satisfies it.
    Exact in float64 up to rounding of the sums; ties go to the first optimum found.
    """
    import torch

    n = len(weights)
    if partitions < 1 or partitions > n:
        raise ValueError(f"partitions must be between 1 and the number of layers ({n}), got {partitions}")
    cost = block_costs(weights, enter, leave, host)
    if allowed is not None:
        cost = cost.masked_fill(~allowed, math.inf)
    best = cost[0].clone()  # best[e]: one block [0, e)
    cuts: List[torch.Tensor] = []
    for _ in range(2, partitions + 1):
        value, arg = torch.maximum(best[:, None], cost).min(dim=0)
        best = value
        cuts.append(arg)
    if not math.isfinite(float(best[n])):
        return None
    sizes: List[int] = []
    end = n
    for cut in reversed(cuts):
        start = int(cut[end])
        sizes.append(end - start)
        end = start
    sizes.append(end)
    sizes.reverse()
    return sizes


def _sums(values: Sequence[float]) -> "torch.Tensor":
    """``[s, e]``: the sum of ``values[s:e]``, from prefix sums (float64)."""
    import torch

    w = torch.tensor([0.0, *values], dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):  # any sign will do: a block's cost is a difference of prefix sums
        raise ValueError("weights must be finite")
    prefix = torch.cumsum(w, 0)
    return prefix[None, :] - prefix[:, None]


def block_costs(
    weights: Sequence[float],
    enter: Optional[Sequence[float]] = None,
    leave: Optional[Sequence[float]] = None,
    host: Optional[Sequence[float]] = None,
) -> "torch.Tensor":
    """Every block's cost as one ``(n+1)²`` float64 matrix: ``[s, e]`` is block ``[s, e)``, +inf where ``s >= e``.

    The one definition :func:`solve_blocks` minimises over and a planner caps
    (a memory estimate under a cap: ``block_costs(...) <= cap``). With ``host``,
    the layers of a block cost the larger of its two sums (see :func:`solve_blocks`).
    """
    import torch

    n = len(weights)
    layers = _sums(weights)
    if host is not None:
        if len(host) != n:
            raise ValueError(f"host has {len(host)} costs for {n} layers")
        layers = torch.maximum(layers, _sums(host))
    zeros = [0.0] * (n + 1)
    a = torch.tensor(list(enter) if enter is not None else zeros, dtype=torch.float64)
    b = torch.tensor(list(leave) if leave is not None else zeros, dtype=torch.float64)
    cost = layers + a[:, None] + b[None, :]
    return cost.masked_fill(~torch.ones(n + 1, n + 1, dtype=torch.bool).triu(1), math.inf)


def block_cost(
    weights: Sequence[float],
    sizes: Sequence[int],
    enter: Optional[Sequence[float]] = None,
    leave: Optional[Sequence[float]] = None,
    host: Optional[Sequence[float]] = None,
) -> List[float]:
    """Each block's cost as :func:`solve_blocks` counts it."""
    out = []
    start = 0
    for size in sizes:
        end = start + size
        layers = sum(weights[start:end])
        if host is not None:
            layers = max(layers, sum(host[start:end]))
        out.append(layers + (enter[start] if enter is not None else 0.0) + (leave[end] if leave is not None else 0.0))
        start = end
    return out
