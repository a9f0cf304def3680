"""A small event-driven simulator: tasks on resources, ordered by dependencies, in fluid time.

Why our own and not a queueing library: the schedules we simulate need three
kinds of resource and nothing else, and the simulator has to be cheap enough to
run thousands of times while a plan is searched. The three kinds:

- **exclusive** resources (a GPU's compute stream, a copy stream, a process's
  interpreter lock): one task at a time, the others wait first come, first
  served (ties: the order the tasks were added, which is the order the engine
  issues them);
- **shared** resources (a host's cores): every task on it runs at once; when
  the threads asked for exceed the capacity, each runs slower in proportion
  (processor sharing: eight one-thread workers on two cores each get a
  quarter of a core); and while more than one runs, each is slowed by the
  resource's ``contention`` (tasks on one host share its caches, memory
  bandwidth and interpreter: two threads each took 1.3-1.6x as long as one
  alone here);
- no resource: a pure delay (a link's latency, a barrier).

A task starts when every task it depends on has finished and its resource
takes it; its ``amount`` is seconds of work at full speed. Time advances from
one completion to the next, with every running task's rate fixed in between.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["Simulator", "Task"]

_EPS = 1e-15


@dataclass
class Task:
    """One piece of work: its resource, amount, dependencies, and when it ran."""

    index: int
    resource: Optional[str]
    amount: float
    weight: float  # threads asked for on a shared resource
    tag: Any  # what the caller wants back (a span, a label)
    waiting: int = 0  # dependencies not finished yet
    dependents: List[int] = field(default_factory=list)
    start: float = -1.0
    end: float = -1.0
    left: float = 0.0


class Simulator:
    """Add resources and tasks, then :meth:`run`; each task's ``start`` and ``end`` are filled in."""

    def __init__(self) -> None:
        self.tasks: List[Task] = []
        self._shared: Dict[str, float] = {}
        self._contention: Dict[str, float] = {}

    def shared(self, name: str, capacity: float, contention: float = 0.0) -> None:
        """Declare ``name`` a shared resource of ``capacity`` (threads); unknown names are exclusive.

        ``contention``: while two or more tasks run on it, each takes ``1 + contention`` times as long.
        """
        if capacity <= 0 or contention < 0:
            raise ValueError(f"capacity must be positive and contention not negative (resource {name!r})")
        self._shared[name] = capacity
        self._contention[name] = contention

    def add(
        self,
        resource: Optional[str],
        amount: float,
        after: Sequence[Optional[int]] = (),
        weight: float = 1.0,
        tag: Any = None,
    ) -> int:
        """A task of ``amount`` seconds on ``resource`` once every task in ``after`` has finished; its index."""
        if amount < 0:
            raise ValueError(f"a task cannot take negative time ({amount})")
        task = Task(len(self.tasks), resource, float(amount), float(weight), tag)
        for d in dict.fromkeys(a for a in after if a is not None):
            if not 0 <= d < task.index:
                raise ValueError(f"a task can only depend on earlier tasks (task {task.index} after {d})")
            self.tasks[d].dependents.append(task.index)
            task.waiting += 1
        self.tasks.append(task)
        return task.index

    def run(self) -> float:
        """Simulate every task; return the time the last one ended (0 with no tasks)."""
        now = 0.0
        queues: Dict[str, List[Tuple[float, int]]] = {}  # exclusive resource: (ready time, index) heap
        running: Dict[str, int] = {}  # exclusive resource: the task holding it
        shared_active: Dict[str, List[int]] = {name: [] for name in self._shared}
        free: List[int] = []  # tasks without a resource
        done = 0

        def ready(index: int) -> None:
            task = self.tasks[index]
            task.left = task.amount
            r = task.resource
            if r is None:
                task.start = now
                free.append(index)
            elif r in self._shared:
                task.start = now
                shared_active[r].append(index)
            elif r not in running:
                task.start = now
                running[r] = index
            else:
                heapq.heappush(queues.setdefault(r, []), (now, index))

        for task in self.tasks:
            if task.waiting == 0:
                ready(task.index)

        while done < len(self.tasks):
            active: List[Tuple[int, float]] = [(i, 1.0) for i in free]
            active += [(i, 1.0) for i in running.values()]
            for name, members in shared_active.items():
                if members:
                    asked = sum(self.tasks[i].weight for i in members)
                    rate = min(1.0, self._shared[name] / asked) if asked > 0 else 1.0
                    if len(members) > 1:
                        rate /= 1.0 + self._contention[name]
                    active += [(i, rate) for i in members]
            if not active:
                raise RuntimeError("the simulated tasks wait on each other: a dependency cycle")
            step = min(self.tasks[i].left / rate for i, rate in active)
            now += step
            finished: List[int] = []
            for i, rate in active:
                task = self.tasks[i]
                task.left -= rate * step
                if task.left <= _EPS * max(1.0, task.amount):
                    finished.append(i)
            for i in sorted(finished):
                task = self.tasks[i]
                task.end = now
                done += 1
                r = task.resource
                if r is None:
                    free.remove(i)
                elif r in self._shared:
                    shared_active[r].remove(i)
                else:
                    del running[r]
                    queue = queues.get(r)
                    if queue:
                        _, nxt = heapq.heappop(queue)
                        self.tasks[nxt].start = now
                        running[r] = nxt
                for d in task.dependents:
                    dependent = self.tasks[d]
                    dependent.waiting -= 1
                    if dependent.waiting == 0:
                        ready(d)
        return max((t.end for t in self.tasks), default=0.0)
