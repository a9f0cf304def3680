"""Watch the engine work: each step's worker, device and host time, and each worker's phase.

Why a hook? A memory meter must charge what each worker allocates to that
worker's device, a timeline needs when each cell ran and where, and a GPU
check needs the host time the engine spends per cell. Reading worker thread
names or patching the engine's internals would tie those tools to details
that change; an :class:`Observer` is the one public way in.

An observer is registered for a block with :func:`observing` and sees every
pipeline that runs in the process meanwhile (like a profiler). Its
:meth:`~Observer.worker` context is entered on each worker's thread around a
phase (the forward pass, or the backward pass), so thread-local state it sets
there (a meter's owner, a profiler range) applies to that worker's steps;
:meth:`~Observer.around` is entered on the same thread around each step, and
:meth:`~Observer.step` receives a :class:`StepRecord` after each step, inside
that context. With no observer registered the engine pays one check per step.

Host times are ``time.perf_counter_ns()`` around the step's Python work: on
a GPU that is the time spent issuing the cell's kernels, not their run time
(the kernels are asynchronous). For device times, record CUDA events on the
device's current stream in :meth:`~Observer.around`: that stream is the one
the step's kernels go to, so two events there bracket them (what a timeline
of a step on GPUs needs).
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Tuple

import torch

__all__ = ["Observer", "StepRecord", "observing", "observers"]


@dataclass(frozen=True)
class StepRecord:
    """One step the engine ran: cell ``(i, j)``, its kind, where, and its host time."""

    phase: str  # 'forward' or 'backward'
    kind: str  # 'forward', 'recompute' or 'backward'
    i: int  # micro-batch
    j: int  # partition
    clock: int  # the schedule's clock in this phase
    worker: int  # index of the worker that ran it (one per distinct device)
    device: torch.device  # the partition's device, as the user gave it
    start_ns: int
    end_ns: int

    @property
    def host_ns(self) -> int:
        return self.end_ns - self.start_ns


class Observer:
    """Base class: override what you need; every hook defaults to doing nothing."""

    def worker(self, worker: int, device: torch.device, phase: str) -> AbstractContextManager[Any]:
        """A context entered on worker ``worker``'s own thread around its part of ``phase``."""
        return nullcontext()

    def around(
        self, phase: str, kind: str, i: int, j: int, clock: int, worker: int, device: torch.device
    ) -> AbstractContextManager[Any]:
        """A context entered on the worker's thread around one step (arguments as in :class:`StepRecord`).

        Entered inside :meth:`worker`'s context, just before the step's host
        time starts; :meth:`step` is called inside it, and it is left right
        after (also when the step raised). On a CUDA device the thread's
        current stream there is the step's compute stream.
        """
        return nullcontext()

    def step(self, record: StepRecord) -> None:
        """Called on the worker's thread after each step (also after a step that raised), inside :meth:`around`."""


_lock = threading.Lock()
_observers: Tuple[Observer, ...] = ()


def observers() -> Tuple[Observer, ...]:
    """The observers registered now (a snapshot)."""
    return _observers


@contextmanager
def observing(observer: Observer) -> Iterator[Observer]:
    """Register ``observer`` for the block; every pipeline run in the process meanwhile reports to it."""
    global _observers
    with _lock:
        _observers = _observers + (observer,)
    try:
        yield observer
    finally:
        with _lock:
            remaining = list(_observers)
            remaining.remove(observer)
            _observers = tuple(remaining)
