"""Micro-batches: split a mini-batch along dim 0 and join the outputs back.

A batch is a tensor or a flat tuple of tensors. Every tensor of a tuple is split
on its first dimension, so a tuple like ``(images, masks)`` travels through the
pipeline as aligned micro-batches. Inside the engine a batch is always held as a
tuple plus an ``atomic`` flag saying whether the user gave a bare tensor; that
keeps every other module free of ``isinstance`` branches.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Tensors", "TensorOrTensors", "micro_batch_sizes", "check", "as_tuple", "unpack", "scatter", "gather"]

Tensors = Tuple[Tensor, ...]
TensorOrTensors = Union[Tensor, Tensors]


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


def check(input: Any) -> None:
    """Raise :class:`TypeError` unless ``input`` is a tensor or a tuple of tensors."""
    if isinstance(input, Tensor):
        return
    if isinstance(input, tuple):
        for x in input:
            if not isinstance(x, Tensor):
                raise TypeError(f"expected Tensor or tuple of Tensors, but the tuple holds {type(x).__name__}")
        return
    raise TypeError(f"expected Tensor or tuple of Tensors, but got {type(input).__name__}")


def as_tuple(value: TensorOrTensors) -> Tuple[Tensors, bool]:
    """Return ``(tensors, atomic)``: the value as a tuple and whether it was a bare tensor."""
    if isinstance(value, Tensor):
        return (value,), True
    return tuple(value), False


def unpack(tensors: Tensors, atomic: bool) -> TensorOrTensors:
    """Inverse of :func:`as_tuple`."""
    return tensors[0] if atomic else tensors


def scatter(input: TensorOrTensors, chunks: int) -> Tuple[List[Tensors], bool]:
    """Split every tensor of ``input`` into at most ``chunks`` pieces along dim 0.

    Like :func:`torch.chunk`, a batch that does not divide evenly gives smaller
    last pieces, and one smaller than ``chunks`` gives fewer micro-batches.
    """
    tensors, atomic = as_tuple(input)
    if not tensors:
        raise TypeError("expected at least one tensor in the input tuple")
    batch_sizes = [t.size(0) if t.dim() else None for t in tensors]
    if None in batch_sizes or len(set(batch_sizes)) != 1:
        raise ValueError(f"every tensor of the input must have the same batch size (dim 0), got sizes {batch_sizes}")
    sizes = micro_batch_sizes(tensors[0].size(0), chunks)
    pieces = [torch.split(t, sizes) for t in tensors]
    return [tuple(p[i] for p in pieces) for i in range(len(pieces[0]))], atomic


def gather(outputs: Sequence[Tensors], atomic: bool) -> TensorOrTensors:
    """Concatenate micro-batch outputs position by position along dim 0."""
    width = len(outputs[0])
    joined = tuple(torch.cat([out[k] for out in outputs]) for k in range(width))
    return unpack(joined, atomic)
