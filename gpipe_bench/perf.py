"""The performance model: the rules that the engine, the memory predictor and the reports must agree on.

Why one module: how a mini-batch splits into micro-batches, which of them are
checkpointed, and how a balance cuts a model into partitions decide what the
engine runs, what the predictor simulates and what the reports call ideal.
Written twice, they would drift apart (they had: three copies of the
checkpoint rule and three of the split). Everything here is arithmetic on
plain numbers, except :func:`split`, which slices any sliceable sequence
(``nn.Sequential`` included) without copying its modules.

The ideal speedup of a pipeline of ``K`` equal partitions over ``M``
micro-batches is ``K·M / (M + K − 1)`` (GPipe's fill-drain bubble), times
:data:`RECOMPUTE_FACTOR` when micro-batches are recomputed: one extra
forward, with a backward of about twice a forward, turns ``F + B`` into
``2F + B``, so r = (F + B) / (2F + B) = 3/4.
"""

from __future__ import annotations

from typing import Any, List, Optional, Protocol, Sequence, Tuple, TypeVar

__all__ = [
    "CHECKPOINT_MODES",
    "RECOMPUTE_FACTOR",
    "micro_batch_sizes",
    "effective_microbatches",
    "checkpoint_stop",
    "checkpointed_microbatches",
    "layer_ranges",
    "split",
    "ideal_speedup",
]

CHECKPOINT_MODES = ("always", "except_last", "never")

#: r = (F + B) / (2F + B) with B ≈ 2F: the cost of one extra forward when recomputing.
RECOMPUTE_FACTOR = 0.75


class _Sliceable(Protocol):
    def __getitem__(self, index: slice, /) -> Any: ...


S = TypeVar("S", bound=_Sliceable)


def micro_batch_sizes(batch: int, chunks: int) -> List[int]:
    """The micro-batch sizes of a batch of ``batch`` in ``chunks`` chunks, as :func:`torch.chunk` cuts it.

    Pieces of ``ceil(batch / chunks)``, the last one smaller; a batch that does
    not fill every chunk gives fewer micro-batches: 10 in 4 is 3, 3, 3, 1, and
    216 in 32 is 31 pieces of 7 (the last of 6). An empty batch is one empty piece.
    """
    if batch < 0 or chunks < 1:
        raise ValueError(f"batch must not be negative and chunks must be positive (batch: {batch}, chunks: {chunks})")
    if batch == 0:
        return [0]
    size = -(-batch // chunks)
    return [min(size, batch - start) for start in range(0, batch, size)]


def effective_microbatches(batch: int, chunks: int) -> int:
    """How many micro-batches ``chunks`` really gives for ``batch``: 216 in 32 chunks gives 31 (of 7)."""
    if batch < 1 or chunks < 1:
        raise ValueError(f"batch and chunks must be positive (batch: {batch}, chunks: {chunks})")
    return len(micro_batch_sizes(batch, chunks))


def checkpoint_stop(checkpoint: str, chunks: int) -> int:
    """Micro-batches ``i < stop`` are checkpointed in training.

    Counted from the *requested* chunks, as torchgpipe 0.0.7 did: with
    ``except_last`` and a batch that gives fewer micro-batches than chunks,
    every micro-batch is checkpointed.
    """
    if checkpoint not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint is not one of {', '.join(CHECKPOINT_MODES)} (checkpoint: {checkpoint!r})")
    return {"always": chunks, "except_last": chunks - 1, "never": 0}[checkpoint]


def checkpointed_microbatches(batch: int, chunks: int, checkpoint: str) -> int:
    """How many micro-batches are recomputed in a training step."""
    return min(effective_microbatches(batch, chunks), checkpoint_stop(checkpoint, chunks))


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


def ideal_speedup(mode: str, devices: int, batch: int, chunks: int, checkpoint: str) -> Optional[float]:
    """``K·M/(M+K−1)``, times r when any micro-batch is recomputed; None unless a pipeline over several devices."""
    if mode != "pipeline" or devices <= 1:
        return None
    k, m = devices, effective_microbatches(batch, chunks)
    ideal = k * m / (m + k - 1)
    return ideal * RECOMPUTE_FACTOR if checkpointed_microbatches(batch, chunks, checkpoint) > 0 else ideal
