"""Checkpointing state: which phase a layer runs in, and the RNG to replay.

Why not :func:`torch.utils.checkpoint`? GPipe must start recomputing a
micro-batch *before* its gradient arrives (while the next partition is still
busy), and it already cuts the autograd graph at partition boundaries, so
recompute is just a step the engine schedules on the partition's worker (see
``schedule.backward_steps``). What this module keeps is the state around it:

- :func:`is_checkpointing` / :func:`is_recomputing`, thread-local flags a layer
  can read to behave differently in the first forward (no graph kept) and in
  the recompute (e.g. deferred BatchNorm counts statistics only once);
- :class:`RNGState`, saved before a checkpointed forward and restored for its
  recompute so dropout draws the same mask both times.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = [
    "CHECKPOINT_MODES",
    "checkpoint_stop",
    "is_checkpointing",
    "is_recomputing",
    "checkpointing",
    "recomputing",
    "RNGState",
    "CPU_RNG_LOCK",
]

CHECKPOINT_MODES = ("always", "except_last", "never")


def checkpoint_stop(checkpoint: str, chunks: int) -> int:
    """Micro-batches ``i < stop`` are checkpointed in training.

    Counted from the *requested* chunks, as torchgpipe 0.0.7 did: with
    ``except_last`` and a batch that gives fewer micro-batches than chunks,
    every micro-batch is checkpointed.
    """
    if checkpoint not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint is not one of {', '.join(CHECKPOINT_MODES)} (checkpoint: {checkpoint!r})")
    return {"always": chunks, "except_last": chunks - 1, "never": 0}[checkpoint]


_local = threading.local()

# The host's default generator is process-wide. When partitions that draw random
# numbers run on several CPU workers at once, their draws interleave and a
# recompute could not replay its forward; such partitions take this lock for
# each forward and recompute (see Pipeline._forward_rng).
CPU_RNG_LOCK = threading.Lock()


def is_checkpointing() -> bool:
    """True while a layer runs in the forward pass of a checkpointed micro-batch (no graph kept)."""
    return bool(getattr(_local, "checkpointing", False))


def is_recomputing() -> bool:
    """True while a layer runs again to rebuild a checkpointed micro-batch's graph before backward."""
    return bool(getattr(_local, "recomputing", False))


@contextmanager
def checkpointing() -> Iterator[None]:
    previous = is_checkpointing()
    _local.checkpointing = True
    try:
        yield
    finally:
        _local.checkpointing = previous


@contextmanager
def recomputing() -> Iterator[None]:
    previous = is_recomputing()
    _local.recomputing = True
    try:
        yield
    finally:
        _local.recomputing = previous


class RNGState:
    """The host generator and, for a CUDA partition, that device's generator."""

    __slots__ = ("cpu", "cuda", "device")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu: Tensor = torch.get_rng_state()
        self.cuda: Optional[Tensor] = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self, host: bool = True) -> Iterator[None]:
        """Run the block with the saved generators, then put the current ones back.

        ``host=False`` leaves the process-wide host generator alone (a GPU
        partition that never draws from it, while other workers may): swapping
        it there would corrupt their draws. The caller decides, and holds
        :data:`CPU_RNG_LOCK` when it swaps the host generator next to others.
        """
        cpu_now = torch.get_rng_state() if host else None
        cuda_now = torch.cuda.get_rng_state(self.device) if self.cuda is not None else None
        if host:
            torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield
        finally:
            if cpu_now is not None:
                torch.set_rng_state(cpu_now)
            if cuda_now is not None:
                torch.cuda.set_rng_state(cuda_now, self.device)
