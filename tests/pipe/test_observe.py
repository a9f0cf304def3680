"""observe.py: observers see every step with its worker, device and host time, and wrap each worker's phase."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Set, Tuple

import pytest
import torch
from torch import nn

from gpipe_bench.pipe import GPipe, Observer, StepRecord, observing
from gpipe_bench.pipe.observe import observers


class Recorder(Observer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: List[Tuple[StepRecord, int]] = []
        self.phases: List[Tuple[int, str, str, int]] = []  # (worker, device, phase, thread)
        self.local = threading.local()

    @contextmanager
    def _phase(self, worker: int, device: torch.device, phase: str) -> Iterator[None]:
        with self.lock:
            self.phases.append((worker, str(device), phase, threading.get_ident()))
        self.local.worker = worker
        try:
            yield
        finally:
            self.local.worker = None

    def worker(self, worker: int, device: torch.device, phase: str) -> Any:
        return self._phase(worker, device, phase)

    def step(self, record: StepRecord) -> None:
        # The worker context is active on the thread that ran the step.
        assert getattr(self.local, "worker", None) == record.worker
        with self.lock:
            self.records.append((record, threading.get_ident()))


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))


@pytest.mark.parametrize("devices", [["cpu:0", "cpu:1", "cpu:2"], ["cpu", "cpu", "cpu"], ["cpu:0", "cpu:1", "cpu:0"]])
def test_every_step_is_reported_once_with_its_worker(devices: List[str]) -> None:
    m, n = 4, 3
    gpipe = GPipe(_model(), [1, 1, 1], devices=devices, chunks=m, checkpoint="except_last")
    recorder = Recorder()
    with observing(recorder):
        gpipe(torch.randn(8, 4)).sum().backward()
    steps = [r for r, _ in recorder.records]
    forward = {(r.i, r.j) for r in steps if r.phase == "forward"}
    backward = {(r.i, r.j) for r in steps if r.kind == "backward"}
    recompute = {(r.i, r.j) for r in steps if r.kind == "recompute"}
    cells = {(i, j) for i in range(m) for j in range(n)}
    assert forward == backward == cells
    assert recompute == {(i, j) for i in range(m - 1) for j in range(n)}  # except_last
    assert len(steps) == len(forward) + len(backward) + len(recompute)

    distinct = list(dict.fromkeys(devices))
    for r in steps:
        assert distinct[r.worker] == devices[r.j] and str(r.device) == devices[r.j]
        assert r.end_ns >= r.start_ns and r.host_ns >= 0
        if r.kind == "forward":
            assert r.clock == r.i + r.j
        elif r.kind == "backward":
            assert r.clock == m + n - 2 - (r.i + r.j)
    # One phase context per worker and phase, on the thread that ran that worker's steps.
    threads = {(r.worker, r.phase): t for r, t in recorder.records}
    entered: Set[Tuple[int, str]] = set()
    for worker, _, phase, thread in recorder.phases:
        assert (worker, phase) not in entered
        entered.add((worker, phase))
        assert threads[(worker, phase)] == thread
    assert entered == {(w, p) for w in range(len(distinct)) for p in ("forward", "backward")}


def test_registration_is_for_the_block_only() -> None:
    gpipe = GPipe(_model(), [2, 1], devices=["cpu:0", "cpu:1"], chunks=2)
    recorder = Recorder()
    with observing(recorder):
        assert observers() == (recorder,)
        gpipe(torch.randn(4, 4)).sum().backward()
    count = len(recorder.records)
    assert count > 0 and observers() == ()
    gpipe(torch.randn(4, 4)).sum().backward()
    assert len(recorder.records) == count


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom")


def test_a_failing_step_is_still_reported_and_the_error_reaches_the_caller() -> None:
    gpipe = GPipe(nn.Sequential(nn.Linear(4, 4), Boom()), [1, 1], devices=["cpu:0", "cpu:1"], chunks=2)
    recorder = Recorder()
    with observing(recorder), pytest.raises(ValueError, match="boom"):
        gpipe(torch.randn(4, 4))
    assert any(r.j == 1 for r, _ in recorder.records)
    assert observers() == ()


class Around(Observer):
    """Sees each step's context: entered on the step's thread, the step reported inside it, then left."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.local = threading.local()
        self.log: List[Tuple[str, Tuple[str, str, int, int, int, int, str], int]] = []

    @contextmanager
    def _around(self, key: Tuple[str, str, int, int, int, int, str]) -> Iterator[None]:
        with self.lock:
            self.log.append(("enter", key, threading.get_ident()))
        self.local.key = key
        try:
            yield
        finally:
            self.local.key = None
            with self.lock:
                self.log.append(("exit", key, threading.get_ident()))

    def around(self, phase: str, kind: str, i: int, j: int, clock: int, worker: int, device: torch.device) -> Any:
        return self._around((phase, kind, i, j, clock, worker, str(device)))

    def step(self, record: StepRecord) -> None:
        key = (record.phase, record.kind, record.i, record.j, record.clock, record.worker, str(record.device))
        assert getattr(self.local, "key", None) == key  # reported inside its own step's context
        with self.lock:
            self.log.append(("step", key, threading.get_ident()))


def test_around_wraps_each_step_on_its_thread_and_an_observer_without_it_still_works() -> None:
    m = 3
    gpipe = GPipe(_model(), [1, 1, 1], devices=["cpu:0", "cpu:1", "cpu:0"], chunks=m, checkpoint="except_last")
    around, plain = Around(), Recorder()  # Recorder overrides worker() and step() only
    with observing(around), observing(plain):
        gpipe(torch.randn(6, 4)).sum().backward()
    steps = [(key, thread) for what, key, thread in around.log if what == "step"]
    assert len(steps) == len(plain.records) == 2 * m * 3 + (m - 1) * 3
    for what in ("enter", "exit"):
        assert sorted((k, t) for w, k, t in around.log if w == what) == sorted(steps)
    # Per thread, each step's enter, report and exit come together, in that order.
    by_thread: Dict[int, List[Tuple[str, Any]]] = {}
    for what, key, thread in around.log:
        by_thread.setdefault(thread, []).append((what, key))
    for events in by_thread.values():
        for k in range(0, len(events), 3):
            (a, ka), (b, kb), (c, kc) = events[k : k + 3]
            assert (a, b, c) == ("enter", "step", "exit") and ka == kb == kc
    # The host time a record carries lies inside its context (the observer's own work is outside it).
    assert all(r.start_ns <= r.end_ns for r, _ in plain.records)


def test_the_default_around_is_a_no_op_context() -> None:
    context = Observer().around("forward", "forward", 0, 0, 0, 0, torch.device("cpu"))
    with context as value:
        assert value is None
