"""Bytes held by tensors, per device, over time: a memory meter that works on CPU and ``meta``.

Why: the published column is "peak memory the CUDA allocator reserved, minus
the model". A CPU has no such allocator to ask, and ``meta`` tensors have no
memory at all, yet a user without GPUs still wants a real figure, and the
predictor (:mod:`gpipe_bench.memory.predict`) needs the same meter on ``meta``.

How: a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every
operator's outputs. An output whose storage is not one of the operator's
inputs' storages is a new allocation (views, in-place and ``out=`` ops return
an existing storage and are skipped); its ``nbytes`` is logged with its owner,
and a finalizer logs its release when the storage dies (PyTorch keeps a
storage's Python object alive as long as the storage, so the finalizer runs
exactly then). The log is folded into a live-bytes curve per owner only at
the end, so storages found later to be model state (gradients, optimizer
buffers) can be left out of the whole curve.

What it does not see: scratch memory inside a kernel that never becomes a
tensor (a convolution's workspace), and allocator rounding and caching. So on
CPU it measures what tensors hold, the part the schedule controls; the CUDA
figure (allocator reserved) includes the rest.

Owners: the engine runs each device's cells on a worker thread of its own.
The meter attaches to those threads through the engine's public hook
(:meth:`TensorMemory.observer`, registered with
:func:`gpipe_bench.pipe.observing`): on each worker's thread it enters a mode
of its own that logs into the same record and charges the worker's device.
The caller's own thread (the loss, the output join, the optimizer) is
charged to ``default_owner``, or to the owner set with
:meth:`TensorMemory.charge`; a worker that runs inline on the caller's thread
(one device) is charged its device the same way.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gpipe_bench.metakernels import meta_shapes
from gpipe_bench.pipe.observe import Observer, observing

__all__ = ["TensorMemory", "Curve", "storage_key"]


def storage_key(tensor: torch.Tensor) -> int:
    """An identity of ``tensor``'s storage, shared by all its views, valid while it lives (also on meta)."""
    return int(tensor.untyped_storage()._cdata)


@dataclass(frozen=True)
class Curve:
    """One owner's live bytes: the peak, and the bytes still held at the end."""

    peak: int
    final: int


class TensorMemory(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Log every tensor storage made inside the ``with`` block, with its owner and lifetime.

    Use::

        meter = TensorMemory(default_owner=1)
        with meter.metering():  # or `with meter:` for this thread alone
            ...train...
        meter.exclude(p.grad for p in model.parameters())
        meter.curves()  # {owner: Curve(peak, final)}
    """

    def __init__(self, default_owner: int = 0) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.default_owner = default_owner
        self._lock = threading.Lock()
        self._serial = itertools.count()
        # (serial, +bytes or -1 for a release, owner) in the order they happened.
        self._log: List[Tuple[int, int, int]] = []
        self._live: Dict[int, int] = {}  # storage key -> serial of the allocation holding it now
        self._excluded: Set[int] = set()
        self._local = threading.local()

    # -- ownership ------------------------------------------------------

    def _owner(self) -> int:
        forced = getattr(self._local, "owner", None)
        return int(forced) if forced is not None else self.default_owner

    def __enter__(self) -> "TensorMemory":
        self._thread = threading.get_ident()
        return super().__enter__()  # type: ignore[no-untyped-call, no-any-return]

    @contextmanager
    def metering(self, owners: Optional[Mapping[str, int]] = None) -> Iterator["TensorMemory"]:
        """Meter the block on this thread and on the workers of every pipeline run in it (see :meth:`observer`)."""
        with self, observing(self.observer(owners)):
            yield self

    def observer(self, owners: Optional[Mapping[str, int]] = None) -> Observer:
        """An engine observer that meters each pipeline worker and charges it its device.

        ``owners``: owner per device name (``"cpu:1"``); a device not in it is
        charged its worker's index.
        """
        return _WorkerMeters(self, dict(owners or {}))

    @contextmanager
    def charge(self, owner: int) -> Iterator[None]:
        """Charge what this thread allocates inside the block to ``owner``."""
        before = getattr(self._local, "owner", None)
        self._local.owner = owner
        try:
            yield
        finally:
            self._local.owner = before

    # -- the log --------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _run_and_log(self, None, func, args, kwargs)

    def _record(self, tensor: torch.Tensor, inputs: Set[int], owner: Optional[int] = None) -> None:
        storage = tensor.untyped_storage()
        key = int(storage._cdata)
        if key in inputs or key in self._live:
            return
        nbytes = int(storage.nbytes())
        with self._lock:
            if key in self._live:
                return
            serial = next(self._serial)
            self._live[key] = serial
            self._log.append((serial, nbytes, self._owner() if owner is None else owner))
        weakref.finalize(storage, self._release, key, serial)

    def _release(self, key: int, serial: int) -> None:
        with self._lock:
            if self._live.get(key) == serial:
                del self._live[key]
            self._log.append((serial, -1, -1))

    def exclude(self, tensors: Iterable[Optional[torch.Tensor]]) -> None:
        """Leave these tensors' storages out of every curve, from their allocation on (model state)."""
        with self._lock:
            for t in tensors:
                if t is not None:
                    serial = self._live.get(storage_key(t))
                    if serial is not None:
                        self._excluded.add(serial)

    # -- the result -----------------------------------------------------

    def mark(self) -> int:
        """A point in the log: :meth:`curves` ``(since=mark)`` gives the peaks after it."""
        with self._lock:
            return len(self._log)

    def serial(self, tensor: torch.Tensor) -> Optional[int]:
        """The allocation now holding ``tensor``'s storage (an id in :meth:`events`), if the meter saw it made."""
        with self._lock:
            return self._live.get(storage_key(tensor))

    def events(self, since: int, until: int, owner: int = 0) -> List[Tuple[int, int]]:
        """``owner``'s allocations and releases between two marks, in order: ``(serial, bytes)``, bytes -1 a release.

        The allocation trace the CUDA allocator model replays
        (:mod:`gpipe_bench.memory.reserved`); model state left out with
        :meth:`exclude` is kept here (the trace decides what it is).
        """
        with self._lock:
            log = list(self._log)
        owners: Dict[int, int] = {}
        for serial, nbytes, who in log[:until]:
            if nbytes >= 0:
                owners[serial] = who
        return [(serial, nbytes) for serial, nbytes, _ in log[since:until] if owners.get(serial) == owner]

    def live_at(self, marks: Sequence[int]) -> List[int]:
        """Live bytes of every owner together (model state excluded) at each of ``marks`` (from :meth:`mark`).

        One pass over the log for all marks: a caller marking after each of many layers
        (the planner's per-layer memory) would pay a pass per mark with :meth:`curves`.
        """
        with self._lock:
            log = list(self._log)
            excluded = set(self._excluded)
        wanted = sorted(set(marks))
        at: Dict[int, int] = {}
        size: Dict[int, int] = {}
        live = 0
        k = 0
        for index, (serial, nbytes, _) in enumerate(log):
            while k < len(wanted) and wanted[k] == index:
                at[wanted[k]] = live
                k += 1
            if nbytes >= 0:
                size[serial] = nbytes
                if serial not in excluded:
                    live += nbytes
            elif serial in size and serial not in excluded:
                live -= size[serial]
        for mark in wanted[k:]:
            at[mark] = live
        return [at[m] for m in marks]

    def curves(self, since: int = 0) -> Dict[int, Curve]:
        """Peak and final live bytes per owner, model state excluded.

        With ``since`` (from :meth:`mark`), the peak is taken over what happened
        after that point only; the bytes held then still count towards it.
        """
        with self._lock:
            log = list(self._log)
            excluded = set(self._excluded)
        size: Dict[int, Tuple[int, int]] = {}
        live: Dict[int, int] = {}
        peak: Dict[int, int] = {}
        for index, (serial, nbytes, owner) in enumerate(log):
            if index == since:
                peak = dict(live)
            if nbytes >= 0:
                size[serial] = (nbytes, owner)
                if serial in excluded:
                    continue
            else:
                if serial not in size or serial in excluded:
                    continue
                nbytes, owner = size[serial]
                nbytes = -nbytes
            live[owner] = live.get(owner, 0) + nbytes
            if index >= since:
                peak[owner] = max(peak.get(owner, 0), live[owner])
        if since >= len(log):
            peak = dict(live)
        owners = set(peak) | {o for _, o in size.values()}
        return {o: Curve(peak=peak.get(o, 0), final=live.get(o, 0)) for o in sorted(owners)}


def _run_and_log(meter: TensorMemory, owner: Optional[int], func: Any, args: Any, kwargs: Any) -> Any:
    """Run the operator; log each output storage that is none of its inputs' (a new allocation)."""
    out = meta_shapes(func, args, kwargs)
    if out is None:
        out = func(*args, **(kwargs or {}))
    inputs = {storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            meter._record(t, inputs, owner)
    return out


class _ThreadMeter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """One worker thread's view of a :class:`TensorMemory`: logs there, charged to one owner."""

    def __init__(self, meter: TensorMemory, owner: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.meter, self.owner = meter, owner

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _run_and_log(self.meter, self.owner, func, args, kwargs)


class _WorkerMeters(Observer):
    """Enters a :class:`_ThreadMeter` on each worker's thread (or charges the caller's, for an inline worker)."""

    def __init__(self, meter: TensorMemory, owners: Dict[str, int]) -> None:
        self.meter, self.owners = meter, owners

    @contextmanager
    def _attach(self, owner: int) -> Iterator[None]:
        if getattr(self.meter, "_thread", None) == threading.get_ident():
            with self.meter.charge(owner):  # the caller's thread: its meter is already active here
                yield
        else:
            with _ThreadMeter(self.meter, owner):
                yield

    def worker(self, worker: int, device: torch.device, phase: str) -> Any:
        return self._attach(self.owners.get(str(device), worker))
