"""How a balance cuts a sequence of layers into partitions: consecutive runs of ``balance[j]`` layers.

One rule for the engine (which places each run on its device), the
distributed stages and the memory predictor (which build the same runs): a
second copy of this arithmetic would be a second answer to which layers a
partition holds.
"""

from __future__ import annotations

from typing import Any, List, Protocol, Sequence, Tuple, TypeVar

__all__ = ["layer_ranges", "split"]


class _Sliceable(Protocol):
    def __getitem__(self, index: slice, /) -> Any: ...


S = TypeVar("S", bound=_Sliceable)


def layer_ranges(balance: Sequence[int]) -> List[Tuple[int, int]]:
    """``[start, end)`` of each partition's layers: consecutive, ``balance[j]`` layers each."""
    ranges, start = [], 0
    for size in balance:
        ranges.append((start, start + size))
        start += size
    return ranges


def split(layers: S, balance: Sequence[int]) -> List[S]:
    """``layers`` cut into consecutive slices of ``balance[j]`` layers (an ``nn.Sequential``'s slices share its modules)."""
    return [layers[start:end] for start, end in layer_ranges(balance)]
