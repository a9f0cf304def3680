"""One training step of each engine, simulated task by task from per-cell costs.

Why simulate rather than use the ideal-speedup formula: the formula assumes
equal partitions, free copies and a host with nothing to do. What actually
bounds a run is the slowest partition at every clock (our engine's workers
meet at a barrier after each clock), recomputation one clock before its
gradient, copies on their own streams, and the host: every worker of our
engine issues its work from one Python interpreter (its lock is one shared
resource), virtual CPU devices share the host's cores, while the distributed
engine's ranks are processes with an interpreter each. Each of those is a
task or a resource in :class:`~.events.Simulator`, placed as the engine
places it:

- **our engine** (:func:`gpipe`): the clocks of :mod:`gpipe_bench.pipe.schedule`
  (the functions the engine runs), one worker per distinct device
  (:func:`gpipe_bench.pipe.copy.worker_groups`), a barrier after every clock
  on the host, the loss between the two phases, the optimizer after them;
- **torch.distributed.pipelining** (:func:`pipelining`): each rank runs its
  actions (:mod:`.orders`) in order, waiting for the activations or gradients
  it receives; sends are asynchronous.

How a cell runs depends on its device. On a GPU the worker's host thread
issues the kernels (``host`` seconds) and the device runs them (``device``
seconds) on its stream, in issue order, once the inputs have arrived; the
host returns before the device is done. On a CPU the worker does both
itself, one after the other. A forward's host work (Python: module calls,
argument parsing) holds the interpreter lock, so the workers' forwards take
turns at it; a backward's runs in autograd's C++ engine with the lock
released, so it is the worker's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from gpipe_bench.distributed.launch import rank_threads as launch_rank_threads
from gpipe_bench.pipe.copy import worker_groups
from gpipe_bench.pipe.schedule import backward_steps, forward_steps
from gpipe_bench.pipe.worker import cpu_worker_threads
from gpipe_bench.timeline.model import Span, Timeline

from .events import Simulator
from .hardware import Link
from .orders import Action

__all__ = [
    "LayerCost",
    "CellCost",
    "Host",
    "Extra",
    "Outcome",
    "worker_threads",
    "rank_threads",
    "gpipe",
    "plain",
    "pipelining",
]


@dataclass(frozen=True)
class LayerCost:
    """Seconds of one layer (or of a partition's layers, summed) on one micro-batch, device and host per pass."""

    forward: float
    backward: float
    forward_host: float = 0.0
    backward_host: float = 0.0
    nograd: float = 1.0  # a no-grad forward (a checkpointed micro-batch's first) / a forward with autograd

    def first_forward(self, checkpointed: bool) -> Tuple[float, float]:
        """(host, device) seconds of a micro-batch's first forward: without autograd when it is checkpointed.

        ``nograd`` is measured as one wall time (host and device together, as a CPU
        runs them), so the share applies to both. The one rule the simulator and the
        planner's stage weights use.
        """
        share = self.nograd if checkpointed else 1.0
        return self.forward_host * share, self.forward * share


@dataclass(frozen=True)
class CellCost(LayerCost):
    """One partition on one micro-batch (a recompute costs a forward), and its output's bytes."""

    out_bytes: int = 0  # what crosses to the next partition (its gradient crosses back)


@dataclass(frozen=True)
class Host:
    """The machine's host: how many threads its cores run at once, and the caller's intra-op threads.

    ``contention``: how much slower each CPU worker computes while another one
    computes too (measured by :mod:`.measured`; 0 for a preset).
    """

    cores: float
    threads: int
    contention: float = 0.0


@dataclass(frozen=True)
class Extra:
    """Work of a step outside the cells: the loss (on the last device) and the optimizer (per device)."""

    loss: Tuple[float, float] = (0.0, 0.0)  # (host, device) seconds
    # (host, device) seconds per device lane of our engine ('cuda:1'), or per rank ('rank1') of the distributed one
    optimizer: Optional[Dict[str, Tuple[float, float]]] = None

    def optimizer_on(self, device: str) -> Tuple[float, float]:
        return (self.optimizer or {}).get(device, (0.0, 0.0))


@dataclass
class Outcome:
    """A simulated step: its duration, the timeline, and each device's busy fraction."""

    seconds: float
    timeline: Timeline
    devices: List[str]

    @property
    def utilisation(self) -> Dict[str, float]:
        return self.timeline.utilisation(self.devices)

    @property
    def busiest(self) -> float:
        """The busiest device's busy fraction of the step."""
        return max(self.utilisation.values(), default=0.0)

    @property
    def bubble(self) -> float:
        """The share of device time the step leaves idle: 1 - mean busy fraction over the devices."""
        u = self.utilisation
        # Never below zero: a device busy the whole step can sum to a hair over 1.0 in floating point.
        return max(0.0, 1.0 - sum(u.values()) / len(u)) if u else 0.0


LinkOf = Callable[[str, str], Optional[Link]]


def _is_cpu(device: str) -> bool:
    return torch.device(device).type == "cpu"


#: The host lock a forward's Python work holds: the one interpreter of our engine's workers.
INTERPRETER = "interpreter"


@dataclass(frozen=True)
class Work:
    """One piece of a step as a lane runs it: who issues it, where it runs, its seconds, what it waits for.

    On a CPU lane (``cpu``) the thread does the host work and then the arithmetic on
    ``threads`` of the shared cores; on a GPU lane the thread issues and the device
    runs in order on its stream (see the module docstring).
    """

    thread: str  # who issues it: a worker's lane, the caller, a rank
    lane: str  # where its device time is spent
    cpu: bool
    host_s: float  # seconds of Python and dispatch on the issuing thread
    device_s: float  # seconds of arithmetic on the lane
    phase: str = "other"  # forward | recompute | backward | other (the loss, the optimizer)
    i: int = -1  # micro-batch
    j: int = -1  # partition or stage
    lock: Optional[str] = INTERPRETER  # the lock its host work holds; None: the thread's own
    threads: int = 1  # intra-op threads of a CPU lane's arithmetic
    after_host: Sequence[Optional[int]] = ()  # tasks its host work waits for (a clock's barrier)
    after_data: Sequence[Optional[int]] = ()  # tasks its inputs come from (a copy, the previous partition)


class _Builder:
    """Places cells on a :class:`Simulator` the way a device runs them (see the module docstring)."""

    def __init__(self, host: Host) -> None:
        self.sim = Simulator()
        self.sim.shared("cores", host.cores, host.contention)
        self.spans: List[Tuple[int, int, str, str, int, int]] = []  # (first task, last task, lane, phase, i, j)
        self.cpu_lanes: set[str] = set()
        self.last_device: Dict[str, int] = {}  # per worker lane: the last device task (streams run in order)
        self.last_host: Dict[str, int] = {}  # per thread: the last task it ran

    def cell(self, work: "Work") -> Tuple[int, int]:
        """Place ``work``: (the task its thread returns after, the device task)."""
        sim = self.sim
        previous = self.last_host.get(work.thread)
        lock = work.lock or f"thread {work.thread}"  # host work outside the interpreter: the thread's own
        if work.cpu:
            self.cpu_lanes.add(work.lane)
            h = sim.add(lock, work.host_s, [previous, *work.after_host, *work.after_data])
            d = sim.add("cores", work.device_s, [h], weight=work.threads)
            returns = d
        else:
            h = sim.add(lock, work.host_s, [previous, *work.after_host])
            d = sim.add(work.lane, work.device_s, [h, self.last_device.get(work.lane), *work.after_data])
            returns = h
        self.last_host[work.thread] = returns
        self.last_device[work.lane] = d
        self.spans.append((h, d, work.lane, work.phase, work.i, work.j))
        return returns, d

    def copy(
        self, link: Optional[Link], src: str, dst: str, nbytes: int, after: Sequence[Optional[int]], i: int, j: int
    ) -> Optional[int]:
        if link is None or src == dst:
            return None
        lane = f"copy {src}->{dst}"
        c = self.sim.add(lane, link.seconds(nbytes), list(after))
        self.spans.append((c, c, lane, "copy", i, j))
        return c

    def outcome(self, title: str, devices: Sequence[str], meta: Dict[str, object]) -> Outcome:
        seconds = self.sim.run()
        tasks = self.sim.tasks
        spans: List[Span] = []
        for first, last, lane, phase, i, j in self.spans:
            start = tasks[first].start if lane in self.cpu_lanes else tasks[last].start
            spans.append(Span(lane, phase, i, j, start, tasks[last].end))
        lanes = list(dict.fromkeys([*devices, *sorted({s.lane for s in spans if s.lane not in devices})]))
        timeline = Timeline(title, spans, lanes, source="simulated", meta=meta)
        return Outcome(seconds, timeline, list(dict.fromkeys(devices)))


def worker_threads(devices: Sequence[str], host: Host) -> int:
    """Intra-op threads of each CPU worker of our engine on ``devices``: the engine's own rule."""
    workers, _ = worker_groups([torch.device(d) for d in devices])
    return cpu_worker_threads(workers, host.threads)


def rank_threads(processes: int, host: Host) -> int:
    """Intra-op threads of each rank of a launch of ``processes``: the launcher's own rule (it sets them)."""
    return launch_rank_threads(processes, host.threads)


def gpipe(
    cells: Sequence[Sequence[CellCost]],
    devices: Sequence[str],
    checkpoint_stop: int,
    host: Host,
    link: LinkOf,
    extra: Extra = Extra(),
    title: str = "",
    engine: str = "gpipe-bench",
) -> Outcome:
    """One step of a GPipe engine: ``cells[i][j]`` is micro-batch ``i`` on partition ``j`` (on ``devices[j]``).

    ``engine``: ours, or ``torchgpipe`` (0.0.7), whose forward runs the same clocks
    but whose backward is autograd's own: each GPU's work on that device's
    autograd thread as soon as its inputs are ready (no barrier between clocks),
    a checkpointed micro-batch recomputed just before its backward, and every CPU
    partition's backward on autograd's one CPU thread, one after another.
    """
    m, n = len(cells), len(devices)
    workers, worker_of = worker_groups([torch.device(d) for d in devices])
    lanes = [str(d) for d in workers]
    lane_of = [lanes[worker_of[j]] for j in range(n)]
    threads = worker_threads(devices, host)
    barrier = len(lanes) > 1  # one worker runs its steps inline, without clocks
    b = _Builder(host)
    fwd_task: Dict[Tuple[int, int], int] = {}
    bwd_task: Dict[Tuple[int, int], int] = {}

    def arrived(source: int, src: int, dst: int, nbytes: int, i: int) -> List[Optional[int]]:
        """What a cell on partition ``dst`` waits for from ``src``: its task, and the copy between their devices."""
        copy = b.copy(link(devices[src], devices[dst]), devices[src], devices[dst], nbytes, [source], i, dst)
        return [source, copy]

    peer_backward = engine == "torchgpipe"

    def thread_of(lane: str, kind: str) -> str:
        if peer_backward and kind != "forward":
            return "autograd cpu" if _is_cpu(lane) else f"autograd {lane}"
        return lane

    def run_clocks(clocks: Sequence[Sequence[Tuple[str, int, int]]], start: Optional[int]) -> Optional[int]:
        gate = start
        for steps in clocks:
            returns: List[int] = []
            for kind, i, j in steps:
                lane = lane_of[j]
                cost = cells[i][j]
                data: List[Optional[int]] = []
                held: Optional[str] = INTERPRETER  # a forward's host work holds the interpreter
                if kind == "forward":
                    if j > 0:
                        data = arrived(fwd_task[(i, j - 1)], j - 1, j, cells[i][j - 1].out_bytes, i)
                    host_s, device_s = cost.first_forward(checkpointed=i < checkpoint_stop)
                elif kind == "recompute":
                    host_s, device_s = cost.forward_host, cost.forward
                else:
                    data = arrived(bwd_task[(i, j + 1)], j + 1, j, cost.out_bytes, i) if j < n - 1 else [loss_device]
                    # torch.autograd.grad runs in C++ with the interpreter released: its host work is the worker's own.
                    host_s, device_s, held = cost.backward_host, cost.backward, None
                thread = thread_of(lane, kind)
                r, d = b.cell(
                    Work(thread, lane, _is_cpu(lane), host_s, device_s, kind, i, j, held, threads, [gate], data)
                )
                if kind == "forward":
                    fwd_task[(i, j)] = d
                elif kind == "backward":
                    bwd_task[(i, j)] = d
                returns.append(r)
            if barrier and not (peer_backward and steps and steps[0][0] != "forward"):
                gate = b.sim.add(None, 0.0, returns)
        return gate

    forward = [[(s.kind, s.i, s.j) for s in steps] for steps in forward_steps(m, n)]
    gate = run_clocks(forward, None)
    # The caller joins the last partition's outputs and computes the loss on the last device.
    caller = "caller"
    loss_lane = lane_of[-1]
    b.last_host[caller] = gate if gate is not None else b.last_host.get(lane_of[0], None)  # type: ignore[assignment]
    loss_host, loss_device_s = extra.loss
    loss_ret, loss_device = b.cell(
        Work(
            caller,
            loss_lane,
            _is_cpu(loss_lane),
            loss_host,
            loss_device_s,
            threads=host.threads,
            after_data=[fwd_task[(i, n - 1)] for i in range(m)],
        )
    )
    backward = [[(s.kind, s.i, s.j) for s in steps] for steps in backward_steps(m, n, lambda i: i < checkpoint_stop)]
    for w in lanes:
        b.last_host[thread_of(w, "backward")] = loss_ret
    gate = run_clocks(backward, loss_ret)
    if peer_backward:  # the caller's backward() returns when autograd's threads are done
        gate = b.sim.add(None, 0.0, [b.last_host[thread_of(w, "backward")] for w in lanes])
    # The optimizer steps each device's parameters on the caller's thread.
    b.last_host[caller] = gate if gate is not None else b.last_host[lanes[0]]
    for lane in lanes:
        h, d = extra.optimizer_on(lane)
        if h or d:
            after = [bwd_task[(i, j)] for i in range(m) for j in range(n) if lane_of[j] == lane]
            b.cell(Work(caller, lane, _is_cpu(lane), h, d, threads=host.threads, after_data=after))
    return b.outcome(title, lanes, {"engine": engine, "micro_batches": m, "partitions": n})


def plain(cost: CellCost, device: str, host: Host, extra: Extra = Extra(), title: str = "") -> Outcome:
    """One step of the plain model on one device: forward, loss, backward, optimizer."""
    b = _Builder(host)
    cpu, threads = _is_cpu(device), host.threads
    _, f = b.cell(Work(device, device, cpu, cost.forward_host, cost.forward, "forward", 0, 0, threads=threads))
    lh, ld = extra.loss
    _, loss = b.cell(Work(device, device, cpu, lh, ld, threads=threads, after_data=[f]))
    _, bwd = b.cell(
        Work(
            device, device, cpu, cost.backward_host, cost.backward, "backward", 0, 0, threads=threads, after_data=[loss]
        )
    )
    oh, od = extra.optimizer_on(device)
    if oh or od:
        b.cell(Work(device, device, cpu, oh, od, threads=threads, after_data=[bwd]))
    return b.outcome(title, [device], {"engine": "plain"})


def pipelining(
    orders: Dict[int, List[Action]],
    cells: Callable[[int, int], CellCost],
    stage_rank: Sequence[int],
    rank_device: Sequence[str],
    host: Host,
    link: LinkOf,
    extra: Extra = Extra(),
    title: str = "",
) -> Outcome:
    """One step of torch.distributed.pipelining: each rank a process running ``orders[rank]`` in order.

    ``cells(stage, i)`` is stage ``stage`` on micro-batch ``i``; the last stage's
    forward includes the loss (torch computes it there). Every rank has its own
    interpreter; CPU ranks share the host's cores, each with its share of threads.
    """
    ranks = len(rank_device)
    threads = rank_threads(ranks, host)
    b = _Builder(host)
    lanes = [f"rank{r} {rank_device[r]}" if ranks > 1 else rank_device[r] for r in range(ranks)]
    done: Dict[Tuple[str, int, int], int] = {}
    stages = len(stage_rank)
    position = {r: 0 for r in range(ranks)}
    # Ranks wait on each other: walk all their programs together, taking each rank's next action once
    # what it waits for has been placed (the actions are valid schedules, so this always progresses).
    remaining = sum(len(o) for o in orders.values())
    while remaining:
        progressed = False
        for r in range(ranks):
            order = orders.get(r, [])
            while position[r] < len(order):
                a = order[position[r]]
                need = (a.kind, a.stage - 1, a.micro_batch) if a.kind == "F" else (a.kind, a.stage + 1, a.micro_batch)
                has_peer = (a.kind == "F" and a.stage > 0) or (a.kind == "B" and a.stage < stages - 1)
                if has_peer and need not in done:
                    break
                data: List[Optional[int]] = []
                cost = cells(a.stage, a.micro_batch)
                if has_peer:
                    peer = need[1]
                    data.append(done[need])
                    src, dst = rank_device[stage_rank[peer]], rank_device[r]
                    nbytes = cells(peer, a.micro_batch).out_bytes if a.kind == "F" else cost.out_bytes
                    if stage_rank[peer] != r:
                        data.append(
                            b.copy(
                                link(src, dst),
                                lanes[stage_rank[peer]],
                                lanes[r],
                                nbytes,
                                [done[need]],
                                a.micro_batch,
                                a.stage,
                            )
                        )
                if a.kind == "B" and a.stage == stages - 1:
                    data.append(done[("F", a.stage, a.micro_batch)])
                host_s, device_s = (
                    (cost.forward_host, cost.forward) if a.kind == "F" else (cost.backward_host, cost.backward)
                )
                if a.kind == "F" and a.stage == stages - 1:
                    host_s, device_s = host_s + extra.loss[0], device_s + extra.loss[1]
                phase = "forward" if a.kind == "F" else "backward"
                _, d = b.cell(
                    Work(
                        lanes[r],
                        lanes[r],
                        _is_cpu(rank_device[r]),
                        host_s,
                        device_s,
                        phase,
                        a.micro_batch,
                        a.stage,
                        lock=f"{INTERPRETER}{r}",  # a process each: an interpreter each
                        threads=threads,
                        after_data=data,
                    )
                )
                done[(a.kind, a.stage, a.micro_batch)] = d
                position[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError("the pipeline orders wait on each other: not a valid schedule")
    for r in range(ranks):
        oh, od = extra.optimizer_on(f"rank{r}")
        if oh or od:
            b.cell(Work(lanes[r], lanes[r], _is_cpu(rank_device[r]), oh, od, lock=f"{INTERPRETER}{r}", threads=threads))
    return b.outcome(title, lanes, {"engine": "distributed", "ranks": ranks})
