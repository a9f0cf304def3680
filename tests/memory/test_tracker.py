"""TensorMemory: exact bytes of new storages, their owners and lifetimes, on CPU, meta and in pipeline workers."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, List

import pytest
import torch
from torch import nn

from gpipe_bench.memory.tracker import TensorMemory
from gpipe_bench.pipe import GPipe, Observer, observing


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_counts_new_storages_until_they_die(device: str) -> None:
    meter = TensorMemory()
    with meter:
        a = torch.empty(1000, device=device)  # 4000 bytes
        b = torch.empty(250, dtype=torch.float64, device=device)  # 2000 bytes
        del a
        c = b * 2  # 2000 more
    curve = meter.curves()[0]
    assert curve.peak == 6000
    assert curve.final == 4000
    del b, c


def test_views_and_in_place_ops_are_not_allocations() -> None:
    outside = torch.zeros(100)
    meter = TensorMemory()
    with meter:
        t = torch.zeros(100)
        view = t[10:].view(10, 9)
        t.add_(1)
        outside.mul_(2)  # an existing storage returned by an in-place op
        torch.add(t, 1, out=outside)
    assert meter.curves()[0].peak == 400
    del t, view


def test_excluded_storages_leave_the_whole_curve() -> None:
    meter = TensorMemory()
    with meter:
        kept = torch.empty(1000)
        state = torch.empty(2000)
        meter.exclude([state, None])
    curve = meter.curves()[0]
    assert curve.peak == 4000 and curve.final == 4000
    del kept, state


def test_owner_by_charge_and_by_worker_observer() -> None:
    meter = TensorMemory(default_owner=5)
    held = []
    with meter:
        held.append(torch.empty(10))
        with meter.charge(2):
            held.append(torch.empty(20))

        def work() -> None:
            # What the engine does on a worker's thread when the meter observes it.
            with meter.observer({"cpu:3": 3}).worker(0, torch.device("cpu:3"), "forward"):
                held.append(torch.empty(30))

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    peaks = {k: c.peak for k, c in meter.curves().items()}
    assert peaks == {2: 80, 3: 120, 5: 40}


def test_peak_since_a_mark_starts_from_what_is_held() -> None:
    meter = TensorMemory()
    with meter:
        big = torch.empty(1000)
        del big
        kept = torch.empty(100)
        mark = meter.mark()
        temp = torch.empty(50)
        del temp
    assert meter.curves()[0].peak == 4000
    assert meter.curves(since=mark)[0].peak == 600
    del kept


@pytest.mark.parametrize("devices", [["cpu:0", "cpu:1"], ["cpu", "cpu"]])
def test_pipeline_workers_report_to_the_meter_through_the_engine_hook(devices: List[str]) -> None:
    """The meter attaches to each worker through gpipe_bench.pipe.observing and charges it its device.

    (It read worker thread names, and relied on the engine copying the caller's dispatch modes onto its
    workers through private torch APIs.) A storage is logged once whichever mode sees it first.
    """
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8))
    pipe = GPipe(model, [2, 1], devices=devices, chunks=2, checkpoint="never")
    x = torch.randn(4, 8)
    distinct = list(dict.fromkeys(devices))
    meter = TensorMemory(default_owner=len(distinct) - 1)
    with meter, observing(meter.observer({d: k for k, d in enumerate(distinct)})):
        pipe(x).sum().backward()
    curves = meter.curves()
    assert set(curves) == set(range(len(distinct)))
    # Partition 0's forward alone keeps Linear(8, 64) and ReLU outputs of both micro-batches: 2 × 2 × 2×64 floats.
    assert curves[0].peak >= 2 * 2 * 2 * 64 * 4
    if len(distinct) > 1:
        assert curves[1].peak > 0


class _Counter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.lock = threading.Lock()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        with self.lock:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu:0", "cpu:1"]])
def test_a_dispatch_mode_sees_the_same_forward_ops_as_on_the_plain_model(devices: list) -> None:
    """A user's mode sees the workers' ops when it attaches to them through the engine's hook."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    x = torch.randn(4, 8)
    plain = _Counter()
    with plain, torch.no_grad():
        model(x)
    pipe = GPipe(model, [2, 2], devices=devices, chunks=1, checkpoint="never")
    seen = _Counter()
    caller = threading.get_ident()

    class Attach(Observer):
        def worker(self, worker: int, device: torch.device, phase: str) -> Any:
            return seen if threading.get_ident() != caller else contextlib.nullcontext()

    with seen, observing(Attach()), torch.no_grad():
        pipe(x)
    # The same per-layer ops, plus the engine's own (chunk, cat, detach): never fewer, never doubled.
    assert plain.calls <= seen.calls < 2 * plain.calls
