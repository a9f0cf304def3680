"""Where stashed skip tensors wait until they are popped.

Outside a pipeline (a plain ``nn.Sequential`` run), each thread has a plain
:class:`SkipTracker`: stash puts a tensor in a dict and pop takes it out, so a
model with skippable layers runs unchanged without GPipe. Inside the pipeline,
the engine installs a tracker per (micro-batch, partition) that also hands
tensors to and from other partitions (see ``pipeline.py``).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

from torch import Tensor

from .namespace import Namespace

__all__ = ["SkipKey", "SkipTracker", "ReplayingTracker", "current_skip_tracker", "use_skip_tracker"]

SkipKey = Tuple[Namespace, str]


class SkipTracker:
    """Holds stashed tensors by (namespace, name) until their pop."""

    def __init__(self) -> None:
        # None is a legal stash (torchgpipe passes it through to the pop).
        self.tensors: Dict[SkipKey, Optional[Tensor]] = {}

    def save(self, key: SkipKey, tensor: Optional[Tensor]) -> None:
        self.tensors[key] = tensor

    def load(self, key: SkipKey) -> Optional[Tensor]:
        """Take the tensor out; :class:`KeyError` if it was never stashed."""
        return self.tensors.pop(key)


class ReplayingTracker(SkipTracker):
    """A tracker whose pops leave the tensor in place, as a detached copy: for running layers more than once.

    Profilers run a layer several times on the same input (with and without
    autograd, forward then recompute); each run of a popping layer must find
    the skip tensor again. The pop hands out a detached tensor so that every
    run's graph starts at it, as it does at a partition boundary.
    """

    def load(self, key: SkipKey) -> Optional[Tensor]:
        value = self.tensors[key]
        return value.detach() if value is not None else None


_local = threading.local()


def current_skip_tracker() -> SkipTracker:
    """The tracker of this thread: the engine's inside a pipeline step, else a thread default."""
    tracker = getattr(_local, "tracker", None)
    if tracker is None:
        tracker = SkipTracker()
        _local.tracker = tracker
    return tracker


@contextmanager
def use_skip_tracker(tracker: SkipTracker) -> Iterator[None]:
    previous = getattr(_local, "tracker", None)
    _local.tracker = tracker
    try:
        yield
    finally:
        _local.tracker = previous
