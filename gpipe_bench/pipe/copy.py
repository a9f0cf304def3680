"""Move a partition's tensors to the next partition's device.

A transfer runs on a copy stream of the receiving device: it waits for the
producer's event (the producer's kernels may still be queued), then the
receiver's compute stream waits for the copy. Both sides record the tensors on
the streams that use them so the allocator never recycles memory in flight.
Tensors already on the right device (every virtual CPU device shares the host's
memory) pass through untouched.
"""
from __future__ import annotations

from typing import Mapping, Tuple

import torch
from torch import Tensor

from .stream import CPU_STREAM, AbstractStream, Event, record_stream, use_stream, wait_event, wait_stream

__all__ = ["storage_device", "transfer"]


def storage_device(device: torch.device) -> torch.device:
    """Where a partition's tensors live.

    Virtual CPU devices ``cpu:k`` all mean host memory; a bare ``cuda`` means the
    current CUDA device, made explicit so tensors' devices compare equal to it.
    """
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _same_place(tensor: Tensor, device: torch.device) -> bool:
    if tensor.device.type != device.type:
        return False
    return device.type == "cpu" or tensor.device.index == device.index


def transfer(
    tensors: Tuple[Tensor, ...],
    device: torch.device,
    ready: Event,
    copy_streams: Mapping[torch.device, AbstractStream],
    compute_stream: AbstractStream,
) -> Tuple[Tensor, ...]:
    """Copy ``tensors`` to ``device`` once ``ready`` fires, overlapping compute.

    A copy between two GPUs is queued on the current streams of both devices,
    so both are made the devices' copy streams: neither device's compute
    stream is held up by the transfer.
    """
    if all(_same_place(t, device) for t in tensors):
        wait_event(compute_stream, ready)
        return tensors
    dst_copy = copy_streams.get(device, CPU_STREAM)
    wait_event(dst_copy, ready)
    moved = []
    for t in tensors:
        if _same_place(t, device):
            moved.append(t)
            continue
        src_copy = copy_streams.get(t.device, CPU_STREAM)
        wait_event(src_copy, ready)
        with use_stream(src_copy), use_stream(dst_copy):
            record_stream(t, src_copy)
            moved.append(t.to(device, non_blocking=True))
    wait_stream(compute_stream, dst_copy)
    for t in moved:
        record_stream(t, compute_stream)
    return tuple(moved)
