"""Move a partition's tensors to the next partition's device.

A transfer runs on a copy stream of the receiving device: it waits for the
producer's event (the producer's kernels may still be queued), then the
receiver's compute stream waits for the copy. Both sides record the tensors on
the streams that use them so the allocator never recycles memory in flight.
Tensors already on the right device (every virtual CPU device shares the host's
memory) pass through untouched.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .stream import AbstractStream, Event, record_stream, use_stream, wait_event, wait_stream

__all__ = ["storage_device", "transfer"]


def storage_device(device: torch.device) -> torch.device:
    """Where a partition's tensors live: virtual CPU devices ``cpu:k`` all mean host memory."""
    if device.type == "cpu":
        return torch.device("cpu")
    return device


def _same_place(tensor: Tensor, device: torch.device) -> bool:
    if tensor.device.type != device.type:
        return False
    return device.type == "cpu" or tensor.device.index == device.index


def transfer(
    tensors: Tuple[Tensor, ...],
    device: torch.device,
    ready: Event,
    copy_stream: AbstractStream,
    compute_stream: AbstractStream,
) -> Tuple[Tensor, ...]:
    """Copy ``tensors`` to ``device`` once ``ready`` fires, overlapping compute."""
    if all(_same_place(t, device) for t in tensors):
        wait_event(compute_stream, ready)
        return tensors
    wait_event(copy_stream, ready)
    moved = []
    with use_stream(copy_stream):
        for t in tensors:
            if _same_place(t, device):
                moved.append(t)
                continue
            record_stream(t, copy_stream)
            moved.append(t.to(device, non_blocking=True))
    wait_stream(compute_stream, copy_stream)
    for t in moved:
        record_stream(t, compute_stream)
    return tuple(moved)
