"""Run clocked steps on one thread per device.

Each device group (a CUDA device, a virtual CPU device ``cpu:k``, or plain
``cpu`` for all partitions at once) gets one thread for one phase (the forward
pass, or the backward pass). The thread runs its steps in clock order; a step of
clock ``k`` waits until every step of clock ``k - 1`` has finished, on every
worker. That barrier is the fill-drain schedule itself, and it gives errors a
clean meaning: when a step fails, the steps of its clock that already started
finish, nothing of a later clock starts, every thread exits, and the caller gets
the original exception with its original traceback.

Threads live for one phase only. Starting a few threads costs microseconds
against milliseconds of work per step, and nothing is left running between
calls, after an error, or when the model is dropped. With a single group the
steps run inline on the caller's thread: no hand-off at all.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

__all__ = ["WorkerSteps", "cpu_worker_threads", "execute"]

#: For each worker, its steps in order as (clock, function).
WorkerSteps = Sequence[Sequence[Tuple[int, Callable[[], None]]]]


def cpu_worker_threads(workers: Sequence[torch.device], threads: int) -> int:
    """Intra-op threads of each CPU worker, out of the caller's ``threads``.

    Next to other workers, the CPU workers share the caller's threads out, so
    that partitions running at once do not oversubscribe the cores; a lone
    worker runs inline on the caller's thread with all of them. The engine
    sets this count on its workers, and a model of the engine (the simulator,
    the planner) asks this function rather than keep a copy of the rule.
    """
    if len(workers) <= 1:
        return threads
    return max(1, threads // max(1, sum(1 for d in workers if d.type == "cpu")))


class _Clocks:
    """Countdown per clock, plus the first failure, shared by the workers of one phase."""

    def __init__(self, counts: Sequence[int]) -> None:
        self._lock = threading.Lock()
        self._left = list(counts)
        self._done = [threading.Event() for _ in counts]
        for k, count in enumerate(counts):
            if count == 0:
                self._done[k].set()
        self.error: Optional[BaseException] = None
        self._error_clock = -1

    @property
    def aborted(self) -> bool:
        return self.error is not None

    def wait(self, since: int, clock: int) -> None:
        """Wait until clocks ``since .. clock - 1`` are done.

        Every earlier clock, not just the one before (a worker's steps may skip
        clocks), but each worker passes where it stopped last time: waiting
        from zero at every step costs a quadratic number of waits in the
        micro-batches (256 micro-batches: ~130,000 per worker per step).
        """
        for event in self._done[since:clock]:
            event.wait()

    def finish(self, clock: int) -> None:
        with self._lock:
            self._left[clock] -= 1
            if self._left[clock] == 0:
                self._done[clock].set()

    def fail(self, clock: int, error: BaseException) -> None:
        with self._lock:
            # Keep the failure of the earliest clock: it is the cause, later ones are consequences.
            if self.error is None or clock < self._error_clock:
                self.error, self._error_clock = error, clock
        self.release()

    def release(self) -> None:
        for event in self._done:
            event.set()


def execute(
    steps: WorkerSteps,
    contexts: Sequence[Callable[[], AbstractContextManager[Any]]],
    num_clocks: int,
) -> None:
    """Run ``steps`` (one list per worker), each worker inside ``contexts[w]()``.

    Raises the first failing step's exception after all workers have stopped.
    """
    if len(steps) == 1:
        with contexts[0]():
            for _, fn in steps[0]:
                fn()
        return

    counts = [0] * num_clocks
    for mine in steps:
        for clock, _ in mine:
            counts[clock] += 1
    clocks = _Clocks(counts)

    def work(w: int) -> None:
        clock, passed = 0, 0
        try:
            with contexts[w]():
                for clock, fn in steps[w]:
                    clocks.wait(passed, clock)
                    passed = clock
                    if clocks.aborted:
                        return
                    fn()
                    clocks.finish(clock)
        except BaseException as error:  # noqa: BLE001 - carried to the caller's thread
            clocks.fail(clock, error)

    threads: List[threading.Thread] = [
        threading.Thread(target=work, args=(w,), name=f"gpipe-worker-{w}", daemon=True) for w in range(len(steps))
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException as interrupt:
        # Ctrl-C in the caller: let running steps finish, start no more, then re-raise.
        clocks.fail(-1, interrupt)
        for t in threads:
            t.join()
        clocks.error = None
        raise
    error = clocks.error
    if error is not None:
        # The raised exception's traceback holds this frame; were ``clocks`` or the local
        # ``error`` still to hold the exception, the two would form a cycle that keeps the
        # failed step's frames, and with them its activations, alive until Python's cycle
        # collector happens to run: after an out-of-memory step, long enough to fail the next.
        clocks.error = None
        try:
            raise error
        finally:
            del error
