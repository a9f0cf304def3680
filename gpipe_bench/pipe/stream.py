"""Device streams with one code path for CPU and CUDA.

On CUDA, compute and copies go to different streams so a transfer between
partitions overlaps the next micro-batch's compute. A CPU has no streams; rather
than scattering ``if device.type == 'cuda'`` through the engine, a CPU "stream"
is the :data:`CPU_STREAM` sentinel and every operation on it is a no-op.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "CPUStream",
    "CPU_STREAM",
    "AbstractStream",
    "Event",
    "new_stream",
    "current_stream",
    "use_stream",
    "record_event",
    "record_ready",
    "wait_event",
    "wait_stream",
    "record_stream",
]


class CPUStream:
    """The stream of a CPU device: operations on it complete immediately."""

    def __repr__(self) -> str:
        return "CPU_STREAM"


CPU_STREAM = CPUStream()
AbstractStream = Union[torch.cuda.Stream, CPUStream]
Event = Optional[torch.cuda.Event]


def new_stream(device: torch.device) -> AbstractStream:
    """A fresh stream on ``device`` (the sentinel on CPU)."""
    if device.type != "cuda":
        return CPU_STREAM
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


def current_stream(device: torch.device) -> AbstractStream:
    """The calling thread's current stream on ``device``."""
    if device.type != "cuda":
        return CPU_STREAM
    return torch.cuda.current_stream(device)


@contextmanager
def use_stream(stream: AbstractStream) -> Iterator[None]:
    """Make ``stream`` current for the block (nothing on CPU)."""
    if isinstance(stream, CPUStream):
        yield
        return
    with torch.cuda.stream(stream):
        yield


def record_event(stream: AbstractStream) -> Event:
    """Mark the work queued so far on ``stream``; ``None`` on CPU (already done)."""
    if isinstance(stream, CPUStream):
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    return event


def record_ready(tensors: Iterable[Optional[Tensor]]) -> Event:
    """One event after the work queued so far on the current stream of *every* CUDA device holding one of ``tensors``.

    The tensors of a tuple may live on different devices (or only a later one
    on a GPU): an event on the first tensor's stream alone would let a worker
    read the others before they are written. The streams are chained (each
    later device's stream waits for the event so far), so one event covers all.
    ``None`` when no tensor is on a GPU.
    """
    event: Event = None
    seen: List[torch.device] = []
    for t in tensors:
        if t is None or not t.is_cuda or t.device in seen:
            continue
        seen.append(t.device)
        stream = current_stream(t.device)
        wait_event(stream, event)
        event = record_event(stream)
    return event


def wait_event(stream: AbstractStream, event: Event) -> None:
    """Make later work on ``stream`` wait for ``event``."""
    if event is None or isinstance(stream, CPUStream):
        return
    stream.wait_event(event)


def wait_stream(waiting: AbstractStream, target: AbstractStream) -> None:
    """Make later work on ``waiting`` wait for what is queued on ``target``."""
    if isinstance(waiting, CPUStream) or isinstance(target, CPUStream):
        return
    waiting.wait_stream(target)


def record_stream(tensor: Tensor, stream: AbstractStream) -> None:
    """Tell the caching allocator that ``stream`` uses ``tensor``'s memory.

    Without it, memory freed on one stream could be reused while a copy on
    another stream still reads it.
    """
    if isinstance(stream, CPUStream) or not tensor.is_cuda:
        return
    tensor.record_stream(stream)
