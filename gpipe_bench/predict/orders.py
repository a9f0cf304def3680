"""The order in which each rank of torch.distributed.pipelining runs its forwards and backwards.

Why our own copy of the orders: torch computes them inside schedule objects
that need a process group and stages to exist; a prediction has neither.
These functions give the same orders from the numbers alone (stages,
processes, micro-batches), and tests/predict/test_orders.py checks them
against torch's own schedule tables, so a change in torch shows up as a
failing test rather than a silently wrong prediction.

- GPipe: every forward, then every backward, in micro-batch order.
- 1F1B: ``min(M, S - s)`` forwards first on stage ``s``, then one backward
  and one forward in turn, then the remaining backwards.
- Interleaved 1F1B (rank ``r`` holds stages ``r, r + P, …``): micro-batches
  go through a rank's stages in rounds of ``M / rounds``; warm-up forwards
  ``(n − 1)·round + 2·(P − 1 − r)``, then one forward and one backward in
  turn (backwards walk the stages in reverse), then the remaining backwards.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple

__all__ = ["Action", "gpipe", "one_f_one_b", "interleaved", "orders", "stage_ranks"]


class Action(NamedTuple):
    """``'F'`` (forward) or ``'B'`` (full backward) of ``stage`` on micro-batch ``micro_batch``."""

    kind: str
    stage: int
    micro_batch: int


def gpipe(stages: int, m: int) -> Dict[int, List[Action]]:
    """One stage per rank: all forwards, then all backwards."""
    return {s: [Action("F", s, i) for i in range(m)] + [Action("B", s, i) for i in range(m)] for s in range(stages)}


def one_f_one_b(stages: int, m: int) -> Dict[int, List[Action]]:
    """One stage per rank: warm-up forwards, then alternate a backward and a forward, then the backwards."""
    out: Dict[int, List[Action]] = {}
    for s in range(stages):
        warm = min(m, stages - s)
        actions = [Action("F", s, i) for i in range(warm)]
        f, b = warm, 0
        while b < m:
            actions.append(Action("B", s, b))
            b += 1
            if f < m:
                actions.append(Action("F", s, f))
                f += 1
        out[s] = actions
    return out


def interleaved(processes: int, local: int, m: int) -> Dict[int, List[Action]]:
    """``local`` stages per rank (rank ``r`` holds ``r, r + P, …``), torch's interleaved 1F1B."""
    rounds = max(1, m // processes)
    if m % rounds:
        raise ValueError(f"interleaved 1F1B needs micro-batches in whole rounds: {m} is not a multiple of {rounds}")
    return {r: _interleaved_rank(r, processes, local, m, m // rounds) for r in range(processes)}


def _interleaved_rank(r: int, p: int, local: int, m: int, per_round: int) -> List[Action]:
    total = local * m
    warm = min((local - 1) * per_round + 2 * (p - 1 - r), total)
    steady = total - warm
    taken: Dict[Tuple[str, int], int] = {}
    actions: List[Action] = []

    def take(kind: str, stage: int) -> None:
        i = taken.get((kind, stage), 0)
        actions.append(Action(kind, stage, i))
        taken[(kind, stage)] = i + 1

    for op in range(warm + steady + warm):
        if op < warm + steady:  # forwards walk the rank's stages in rounds
            take("F", ((op // per_round) % local) * p + r)
        if op >= warm:  # backwards walk them in reverse, starting after the warm-up
            take("B", (local - 1 - ((op - warm) // per_round) % local) * p + r)
    return actions


def stage_ranks(schedule: str, stages: int, processes: int) -> List[int]:
    """The rank that holds each stage: its own under GPipe/1F1B, round-robin when interleaved."""
    if schedule == "interleaved":
        return [s % processes for s in range(stages)]
    return list(range(stages))


def orders(schedule: str, stages: int, processes: int, m: int) -> Dict[int, List[Action]]:
    """Each rank's actions under ``schedule`` ('gpipe', '1f1b' or 'interleaved')."""
    if schedule == "gpipe":
        return gpipe(stages, m)
    if schedule == "1f1b":
        return one_f_one_b(stages, m)
    if schedule == "interleaved":
        return interleaved(processes, stages // processes, m)
    raise ValueError(f"unknown schedule {schedule!r}; known: gpipe, 1f1b, interleaved")
