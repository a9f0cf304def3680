"""Check stash/pop pairs of a sequence, and find which partitions they connect.

:func:`verify_skippables` runs before anything executes: every stashed name
must be popped exactly once by a later layer of the same namespace, so a typo
fails at construction instead of deep inside a pipeline run.
:func:`inspect_skip_layout` tells the engine, for each partition, which skip
tensors leave it for a later partition and which arrive from an earlier one.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

from torch import nn

from .skippable import Skippable
from .tracker import SkipKey

__all__ = ["verify_skippables", "SkipLayout", "inspect_skip_layout"]


def verify_skippables(module: nn.Sequential) -> None:
    """Raise :class:`TypeError` listing every unmatched or ambiguous stash/pop of ``module``."""
    stashed: Set[SkipKey] = set()
    popped: Set[SkipKey] = set()
    problems: List[str] = []

    for layer_name, layer in module.named_children():
        if not isinstance(layer, Skippable):
            continue
        for name in sorted(layer.stashable_names & layer.poppable_names):
            problems.append(f"'{layer_name}' declares '{name}' both as stashable and as poppable")
        for key in layer.stashable():
            if key[1] in layer.poppable_names:
                continue
            if key in stashed:
                problems.append(
                    f"'{layer_name}' stashes '{key[1]}' again in the same namespace (isolate it with a Namespace)"
                )
                continue
            stashed.add(key)
        for key in layer.poppable():
            if key[1] in layer.stashable_names:
                continue
            if key in popped:
                problems.append(
                    f"'{layer_name}' pops '{key[1]}' again in the same namespace (isolate it with a Namespace)"
                )
                continue
            if key not in stashed:
                problems.append(f"'{layer_name}' pops '{key[1]}' but no earlier layer stashes it")
                continue
            popped.add(key)

    for _, name in sorted(stashed - popped, key=lambda key: key[1]):
        problems.append(f"'{name}' is stashed but no later layer pops it")

    if problems:
        lines = "\n".join(f"* {p}" for p in problems)
        raise TypeError(f"one or more pairs of stash and pop do not match:\n\n{lines}")


class SkipLayout:
    """For each skip key that crosses partitions: the stashing and the popping partition."""

    def __init__(self, routes: Dict[SkipKey, Tuple[int, int]]) -> None:
        self.routes = routes
        self._outgoing: Dict[int, Set[SkipKey]] = {}
        self._incoming: Dict[int, List[Tuple[SkipKey, int]]] = {}
        for key, (src, dst) in routes.items():
            self._outgoing.setdefault(src, set()).add(key)
            self._incoming.setdefault(dst, []).append((key, src))

    def outgoing(self, j: int) -> Set[SkipKey]:
        """Keys stashed in partition ``j`` and popped in a later partition."""
        return self._outgoing.get(j, set())

    def incoming(self, j: int) -> List[Tuple[SkipKey, int]]:
        """(key, source partition) of skip tensors popped in partition ``j`` but stashed earlier."""
        return self._incoming.get(j, [])


def inspect_skip_layout(partitions: Sequence[nn.Sequential]) -> SkipLayout:
    stashed_at: Dict[SkipKey, int] = {}
    routes: Dict[SkipKey, Tuple[int, int]] = {}
    for j, partition in enumerate(partitions):
        for layer in partition.children():
            if not isinstance(layer, Skippable):
                continue
            for key in layer.stashable():
                stashed_at[key] = j
            for key in layer.poppable():
                src = stashed_at.get(key)
                if src is not None and src != j:
                    routes[key] = (src, j)
    return SkipLayout(routes)
