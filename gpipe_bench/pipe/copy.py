"""Move a partition's tensors to the next partition's device.

A transfer runs on copy streams, never on a compute stream: it waits for the
producer's event (the producer's kernels may still be queued), then the
receiver's compute stream waits for an event recorded right after the copy.
Both sides record the tensors on the streams that use them so the allocator
never recycles memory in flight. Tensors already on the right device (every
virtual CPU device shares the host's memory) pass through untouched, but are
still recorded on the receiver's compute stream: they were made on another.

Each GPU has two copy streams (:class:`CopyStreams`): one for copies arriving
(used only by that device's worker, which does its own receiving) and one for
copies leaving. With a single stream per device, a device's compute could
wait on an unrelated outgoing copy queued by another worker.

Into host memory a copy is blocking: a CPU worker reads the tensor as soon as
the transfer returns, and a CPU has no stream to wait on.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import Tensor

from .stream import CPU_STREAM, AbstractStream, Event, new_stream, record_event, record_stream, use_stream, wait_event

__all__ = ["CopyStreams", "storage_device", "worker_groups", "transfer"]


def storage_device(device: torch.device) -> torch.device:
    """Where a partition's tensors live.

    Virtual CPU devices ``cpu:k`` all mean host memory; a bare ``cuda`` means the
    current CUDA device, made explicit so tensors' devices compare equal to it.
    """
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        # Without CUDA (sizing a GPU row on a laptop) the current device would be the first.
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def worker_groups(devices: Sequence[torch.device]) -> Tuple[List[torch.device], List[int]]:
    """The engine's workers for partitions on ``devices``: one per distinct device, and each partition's worker.

    A GPU is one worker however it is spelled (``cuda``, ``cuda:0``); virtual
    CPU devices are distinct workers although they share host memory, and
    plain ``cpu`` repeated is one worker. Memory figures per device follow the
    same grouping (partitions on one worker share its memory).
    """
    keys: List[torch.device] = []
    index: List[int] = []
    for device in devices:
        place = storage_device(device)
        key = place if place.type == "cuda" else device
        if key not in keys:
            keys.append(key)
        index.append(keys.index(key))
    return keys, index


class CopyStreams:
    """An incoming and an outgoing copy stream per GPU; the CPU sentinel for host memory.

    Made on the caller's thread before any worker starts, so workers only read it.
    """

    def __init__(self, places: Iterable[torch.device] = ()) -> None:
        gpus = sorted({p for p in places if p.type == "cuda"}, key=str)
        self._incoming: Dict[torch.device, AbstractStream] = {p: new_stream(p) for p in gpus}
        self._outgoing: Dict[torch.device, AbstractStream] = {p: new_stream(p) for p in gpus}

    def incoming(self, device: torch.device) -> AbstractStream:
        return self._incoming.get(device, CPU_STREAM)

    def outgoing(self, device: torch.device) -> AbstractStream:
        return self._outgoing.get(device, CPU_STREAM)


def _same_place(tensor: Tensor, device: torch.device) -> bool:
    if tensor.device.type != device.type:
        return False
    return device.type == "cpu" or tensor.device.index == device.index


def transfer(
    tensors: Tuple[Tensor, ...],
    device: torch.device,
    ready: Event,
    streams: CopyStreams,
    compute_stream: AbstractStream,
) -> Tuple[Tensor, ...]:
    """Copy ``tensors`` to ``device`` once ``ready`` fires, overlapping compute.

    A copy between two GPUs is queued on the current streams of both devices,
    so both are made copy streams (the source's outgoing, the destination's
    incoming): neither device's compute stream is held up by the transfer.
    """
    if all(_same_place(t, device) for t in tensors):
        wait_event(compute_stream, ready)
        for t in tensors:
            record_stream(t, compute_stream)
        return tensors
    dst_copy = streams.incoming(device)
    wait_event(dst_copy, ready)
    moved = list(tensors)
    # The stream contexts are entered once per source device, not once per tensor.
    by_source: Dict[torch.device, List[int]] = {}
    for k, t in enumerate(tensors):
        if not _same_place(t, device):
            by_source.setdefault(t.device, []).append(k)
    for source, indices in by_source.items():
        src_copy = streams.outgoing(source)
        wait_event(src_copy, ready)
        with use_stream(src_copy), use_stream(dst_copy):
            for k in indices:
                record_stream(tensors[k], src_copy)
                # Into host memory: blocking (the source's copy stream is synchronised), see above.
                moved[k] = tensors[k].to(device, non_blocking=device.type == "cuda")
    wait_event(compute_stream, record_event(dst_copy))
    for t in moved:
        record_stream(t, compute_stream)
    return tuple(moved)
