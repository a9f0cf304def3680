"""Tests of gpipe_bench.pipe.worker.execute: clocked steps on one thread per worker."""

from __future__ import annotations

import gc
import random
import threading
import time
import traceback
import weakref
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, List, Tuple

import pytest
import torch

from gpipe_bench.pipe.schedule import forward_steps
from gpipe_bench.pipe.worker import cpu_worker_threads, execute


def _null_contexts(n: int) -> List[Callable[[], object]]:
    return [nullcontext for _ in range(n)]


class Log:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: List[Tuple[str, int, int, int]] = []  # (kind, clock, worker, thread ident)

    def add(self, kind: str, clock: int, worker: int) -> None:
        with self.lock:
            self.events.append((kind, clock, worker, threading.get_ident()))

    def step(self, clock: int, worker: int, delay: float = 0.0) -> Callable[[], None]:
        def fn() -> None:
            self.add("start", clock, worker)
            if delay:
                time.sleep(delay)
            self.add("end", clock, worker)

        return fn


def _assert_barrier(events: List[Tuple[str, int, int, int]]) -> None:
    """No step of clock k starts before every step of clock k-1 (and earlier) has ended."""
    ended = set()
    all_steps = {(c, w) for kind, c, w, _ in events if kind == "start"}
    for kind, clock, worker, _ in events:
        if kind == "start":
            earlier = {(c, w) for c, w in all_steps if c < clock}
            missing = earlier - ended
            assert not missing, f"step of clock {clock} on worker {worker} started before {sorted(missing)} ended"
        else:
            ended.add((clock, worker))


def test_pipeline_shaped_plan_runs_in_clock_order() -> None:
    # The shape the engine uses: worker j runs cell (i, j) at clock i + j.
    m, n = 5, 3
    rng = random.Random(0)
    log = Log()
    clocks = forward_steps(m, n)
    plan: List[List[Tuple[int, Callable[[], None]]]] = [[] for _ in range(n)]
    for clock, steps in enumerate(clocks):
        for s in steps:
            plan[s.j].append((clock, log.step(clock, s.j, rng.uniform(0, 0.004))))
    execute(plan, _null_contexts(n), len(clocks))

    starts = [(c, w) for kind, c, w, _ in log.events if kind == "start"]
    assert sorted(starts) == sorted((i + j, j) for i in range(m) for j in range(n))
    _assert_barrier(log.events)
    # Each worker ran its own steps on one thread of its own, not the caller's.
    threads = {}
    for _, _, w, ident in log.events:
        threads.setdefault(w, set()).add(ident)
    assert all(len(ids) == 1 for ids in threads.values())
    assert len({next(iter(ids)) for ids in threads.values()}) == n
    assert threading.get_ident() not in {next(iter(ids)) for ids in threads.values()}


def test_barrier_waits_for_slow_step() -> None:
    # Worker 0 is slow at clock 0; worker 1's clock-1 step must wait for it.
    log = Log()
    plan = [
        [(0, log.step(0, 0, 0.05)), (1, log.step(1, 0))],
        [(0, log.step(0, 1)), (1, log.step(1, 1)), (2, log.step(2, 1))],
    ]
    execute(plan, _null_contexts(2), 3)
    _assert_barrier(log.events)
    assert len(log.events) == 10


def test_several_steps_per_clock_on_one_worker() -> None:
    # A worker may hold several steps of one clock (a backward and a recompute).
    log = Log()
    plan = [
        [(0, log.step(0, 0)), (0, log.step(0, 0, 0.01)), (1, log.step(1, 0))],
        [(0, log.step(0, 1)), (1, log.step(1, 1)), (1, log.step(1, 1))],
    ]
    execute(plan, _null_contexts(2), 2)
    _assert_barrier(log.events)
    assert sum(1 for e in log.events if e[0] == "start") == 6


def test_contexts_wrap_each_worker() -> None:
    entered: List[Tuple[int, int]] = []
    inside = threading.local()

    def make(w: int) -> Callable[[], object]:
        @contextmanager
        def context() -> Iterator[None]:
            entered.append((w, threading.get_ident()))
            inside.worker = w
            try:
                yield
            finally:
                inside.worker = None

        return context

    seen: List[Tuple[int, int]] = []
    lock = threading.Lock()

    def step(w: int) -> Callable[[], None]:
        def fn() -> None:
            with lock:
                seen.append((w, getattr(inside, "worker", None)))

        return fn

    plan = [[(0, step(0)), (1, step(0))], [(1, step(1))], [(2, step(2))]]
    execute(plan, [make(w) for w in range(3)], 3)
    assert sorted(w for w, _ in entered) == [0, 1, 2]
    assert all(w == got for w, got in seen)
    assert len(seen) == 4


def explode() -> None:
    raise ValueError("boom from a step")


def test_exception_reaches_caller() -> None:
    baseline = threading.active_count()
    log = Log()

    def failing() -> None:
        log.add("start", 1, 1)
        time.sleep(0.01)  # let the other step of clock 1 start too
        explode()

    plan = [
        [(0, log.step(0, 0)), (1, log.step(1, 0, 0.05)), (2, log.step(2, 0)), (3, log.step(3, 0))],
        [(0, log.step(0, 1)), (1, failing), (2, log.step(2, 1)), (3, log.step(3, 1))],
        [(1, log.step(1, 2)), (2, log.step(2, 2))],
    ]
    with pytest.raises(ValueError, match="boom from a step") as excinfo:
        execute(plan, _null_contexts(3), 4)

    # The original traceback: the raising function's frame is in it.
    names = [frame.name for frame in traceback.extract_tb(excinfo.tb)]
    assert "explode" in names
    assert "failing" in names

    # Steps of later clocks never ran; the steps of the failing clock that started finished.
    assert not [e for e in log.events if e[1] >= 2]
    started = {(c, w) for kind, c, w, _ in log.events if kind == "start"}
    ended = {(c, w) for kind, c, w, _ in log.events if kind == "end"}
    assert (1, 1) in started
    assert started - {(1, 1)} <= ended

    # Every worker thread has exited.
    assert threading.active_count() == baseline


def test_exception_in_first_clock() -> None:
    baseline = threading.active_count()
    ran = []
    plan = [
        [(0, explode), (1, lambda: ran.append(1))],
        [(0, lambda: None), (1, lambda: ran.append(2))],
    ]
    with pytest.raises(ValueError):
        execute(plan, _null_contexts(2), 2)
    assert ran == []
    assert threading.active_count() == baseline


def test_exception_in_context_reaches_caller() -> None:
    baseline = threading.active_count()

    @contextmanager
    def broken() -> Iterator[None]:
        raise RuntimeError("context failed")
        yield  # pragma: no cover

    ran = []
    plan = [[(0, lambda: ran.append(0)), (1, lambda: ran.append(1))], [(0, lambda: ran.append(2))]]
    with pytest.raises(RuntimeError, match="context failed"):
        execute(plan, [nullcontext, broken], 2)
    assert 1 not in ran
    assert threading.active_count() == baseline


def test_base_exception_is_carried() -> None:
    class Stop(BaseException):
        pass

    def stop() -> None:
        raise Stop()

    baseline = threading.active_count()
    with pytest.raises(Stop):
        execute([[(0, stop)], [(0, lambda: None)]], _null_contexts(2), 1)
    assert threading.active_count() == baseline


def test_executor_reusable_after_error() -> None:
    with pytest.raises(ValueError):
        execute([[(0, explode)], [(0, lambda: None)]], _null_contexts(2), 1)
    log = Log()
    execute([[(0, log.step(0, 0))], [(0, log.step(0, 1))]], _null_contexts(2), 1)
    assert len(log.events) == 4


def test_single_worker_runs_inline() -> None:
    caller = threading.get_ident()
    baseline = threading.active_count()
    idents: List[int] = []
    counts: List[int] = []
    order: List[int] = []

    def step(k: int) -> Callable[[], None]:
        def fn() -> None:
            idents.append(threading.get_ident())
            counts.append(threading.active_count())
            order.append(k)

        return fn

    entered = []

    @contextmanager
    def context() -> Iterator[None]:
        entered.append(threading.get_ident())
        yield

    execute([[(0, step(0)), (1, step(1)), (1, step(2)), (2, step(3))]], [context], 3)
    assert idents == [caller] * 4
    assert entered == [caller]
    assert counts == [baseline] * 4  # no thread started
    assert order == [0, 1, 2, 3]


def test_single_worker_exception_inline() -> None:
    ran = []
    with pytest.raises(ValueError) as excinfo:
        execute([[(0, explode), (1, lambda: ran.append(1))]], _null_contexts(1), 2)
    assert ran == []
    assert "explode" in [f.name for f in traceback.extract_tb(excinfo.tb)]


# Regression (fixed): a step waits only for the clock just before its own, so when that
# clock has no steps (its countdown starts at zero) the step can start while steps of older clocks
# still run. The engine's own plans never have empty clocks, but execute() accepts them.


def test_barrier_across_an_empty_clock() -> None:
    log = Log()
    plan = [[(0, log.step(0, 0, 0.05))], [(2, log.step(2, 1))]]
    execute(plan, _null_contexts(2), 3)
    _assert_barrier(log.events)


# Regression (fixed): the re-raised error kept itself alive through the caller's frame (its
# traceback holds the frame, the frame's local held the error), so a failed step's frames and
# what they referenced stayed alive until Python's cycle collector happened to run.
def test_a_failed_steps_locals_are_freed_without_the_cycle_collector() -> None:
    class Payload:
        pass

    refs: List["weakref.ref[Payload]"] = []

    def failing() -> None:
        held = Payload()  # a failed step's local, as a cell's activations are
        refs.append(weakref.ref(held))
        explode()

    plan = [[(0, _nothing), (1, failing)], [(0, _nothing), (1, _nothing)]]
    gc.disable()
    try:
        with pytest.raises(ValueError, match="boom from a step"):
            execute(plan, _null_contexts(2), 2)
        assert refs and refs[0]() is None
    finally:
        gc.enable()


def _nothing() -> None:
    pass


def test_cpu_workers_share_the_callers_threads_when_there_are_several() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert cpu_worker_threads([torch.device("cpu")], 8) == 8  # a lone worker runs inline with all
    assert cpu_worker_threads([torch.device("cpu", 0), torch.device("cpu", 1)], 8) == 4
    assert cpu_worker_threads([torch.device("cpu", k) for k in range(3)], 8) == 2
    assert cpu_worker_threads([torch.device("cpu", k) for k in range(16)], 8) == 1  # at least one
    assert cpu_worker_threads([gpu, cpu], 8) == 8  # the GPU's worker takes no share
    assert cpu_worker_threads([gpu, torch.device("cuda", 1)], 8) == 8
