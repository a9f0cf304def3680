"""The performance model: the rules that the engine, the memory predictor and the reports must agree on.

Why one module: how a mini-batch splits into micro-batches, which of them are
checkpointed, and how a balance cuts a model into partitions decide what the
engine runs, what the predictor simulates and what the reports call ideal.
Written twice, they would drift apart (they had: three copies of the
checkpoint rule and three of the split).

The rules the engine itself needs live in the engine, which stands alone like
torchgpipe's package: :func:`micro_batch_sizes` in ``pipe.microbatch``,
:data:`CHECKPOINT_MODES` and :func:`checkpoint_stop` in ``pipe.checkpoint``,
:func:`layer_ranges` and :func:`split` in ``pipe.partitions``. This module
re-exports them for the harness, and keeps what only the harness uses: how
many micro-batches a batch really gives, how many are recomputed, and the
ideal speedup.

The ideal speedup of a pipeline of ``K`` equal partitions over ``M``
micro-batches is ``K·M / (M + K − 1)`` (GPipe's fill-drain bubble), times
:data:`RECOMPUTE_FACTOR` when micro-batches are recomputed: one extra
forward, with a backward of about twice a forward, turns ``F + B`` into
``2F + B``, so r = (F + B) / (2F + B) = 3/4.
"""

from __future__ import annotations

from typing import Optional

from gpipe_bench.pipe.checkpoint import CHECKPOINT_MODES, checkpoint_stop
from gpipe_bench.pipe.microbatch import micro_batch_sizes
from gpipe_bench.pipe.partitions import layer_ranges, split

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

#: r = (F + B) / (2F + B) with B ≈ 2F: the cost of one extra forward when recomputing.
RECOMPUTE_FACTOR = 0.75


def effective_microbatches(batch: int, chunks: int) -> int:
    """How many micro-batches ``chunks`` really gives for ``batch``: 216 in 32 chunks gives 31 (of 7)."""
    if batch < 1 or chunks < 1:
        raise ValueError(f"batch and chunks must be positive (batch: {batch}, chunks: {chunks})")
    return len(micro_batch_sizes(batch, chunks))


def checkpointed_microbatches(batch: int, chunks: int, checkpoint: str) -> int:
    """How many micro-batches are recomputed in a training step."""
    return min(effective_microbatches(batch, chunks), checkpoint_stop(checkpoint, chunks))


def ideal_speedup(mode: str, devices: int, batch: int, chunks: int, checkpoint: str) -> Optional[float]:
    """``K·M/(M+K−1)``, times r when any micro-batch is recomputed; None unless a pipeline over several devices."""
    if mode != "pipeline" or devices <= 1:
        return None
    k, m = devices, effective_microbatches(batch, chunks)
    ideal = k * m / (m + k - 1)
    return ideal * RECOMPUTE_FACTOR if checkpointed_microbatches(batch, chunks, checkpoint) > 0 else ideal
