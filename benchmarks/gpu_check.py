"""Everything a GPU machine should check, in one run that installs nothing: ``make gpu-check``.

Made for a lent GPU box with its own Python (torch preinstalled, no package
index) and a hard time limit: it uses the interpreter it is run with and the
package from the working tree (``PYTHONPATH=.``), never a virtual environment.
It ends with one screen: the card, torch and CUDA versions, each step's
verdict and figures. Without CUDA it exits 2 at once with one line on stderr.

Why it is built the way it is: a lent machine is taken back when its time is
up, so a check that hangs, or that dies before printing, leaves nothing. So:

- The driver never imports torch: a child process probes torch and CUDA, and
  every step runs in a child of its own, in a session of its own, with its
  output going to a log file (``NAME.log`` in the output folder), not to pipes
  that a stray grandchild could hold open.
- Each step has a cap; past it the step *fails* ("timed out after N s (its
  cap)"). The whole check has a budget (``--budget``, 450 s) counted from the
  start of the process, so that it ends inside the Makefile's ``timeout``;
  a step stopped because the budget ran out is *cut* ("cut (budget)"), and a
  step never started for want of time is *skipped*.
- A step is stopped with SIGTERM to its process group (torchrun's agent then
  stops its ranks), a few seconds' grace, then SIGKILL to the group and to
  every process the step started, also those that moved to a session of their
  own (torchrun's ranks do). On Linux the driver is a child subreaper, so
  processes orphaned by a step are re-parented to it and cannot escape.
- On SIGTERM (what ``timeout`` sends), SIGINT or SIGHUP the driver stops the
  running step the same way, prints the summary so far, writes its files and
  exits non-zero. ``summary.txt`` and ``summary.json`` are also rewritten
  after every step, so even a SIGKILL loses only the step that was running.
- A failed or cut step shows its failed test ids (pytest's ``FAILED``/``ERROR``
  lines) and the last lines of its log in the summary.

The output folder is ``--out`` (or env ``GPU_CHECK_OUT``); without either, env
``OUT`` when set (a lent machine hands back what is written under ``$OUT``),
else a fresh temporary folder. Its path is printed at the start.

Steps (``--only NAME`` runs some of them):

- ``tests``: the tests marked ``cuda``, each with a 120 s timeout (on a timeout
  pytest-timeout dumps every thread's stack, also one stuck in C++).
- ``mixed``: host and GPU partitions in one pipeline, ``['cpu', 'cuda:0']`` and
  ``['cuda:0', 'cpu']``: forward and backward equal the plain model (float64).
- ``mixed-timed``: a small model over ``['cuda:0', 'cpu', 'cuda:0']`` with 8
  micro-batches: gradients equal the plain model's (float64), and the median
  training step time after a warm-up.
- ``syncs``: one training step under ``torch.cuda.set_sync_debug_mode('warn')``
  at 4 and at 16 micro-batches; the engine's host synchronisations must not
  grow with the micro-batches (target: none per micro-batch).
- ``profile``: ResNet-101 ``pipeline-2`` (its balance, 32 micro-batches of 16
  at 224x224) on ``cuda:0*2``. Steps without the profiler give the step's wall
  time and the engine's host time per cell (forward, recompute, backward, from
  :mod:`gpipe_bench.pipe.observe`); one step under the profiler gives the GPU's
  busy (kernel) time, reported as a fraction of the unprofiled wall time (the
  profiler's per-operator cost inflates host time, not kernel time). Beside the
  engine's host time per micro-batch, the plain model's, doing gradient
  accumulation over the same micro-batches.
- ``speed``: the quick ResNet-101 speed table on ``cuda:0*8``.
- ``memory``: the quick AmoebaNet-D memory table on ``cuda:0*8``, per device.
- ``distributed``: the distributed engine on CUDA: one NCCL process holding
  both stages of ``pipeline-2`` (interleaved schedule; one GPU cannot host two
  NCCL ranks).
- ``engine``: the engine micro-benchmark on ``cuda:0`` (plain model vs our
  GPipe vs torchgpipe where installed); its ratio rows are shown.

Usage::

    make gpu-check                       # python3 on PATH
    make gpu-check PY=/opt/venv/bin/python
    PYTHONPATH=. python3 benchmarks/gpu_check.py --only mixed,syncs --out /tmp/check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def _process_start() -> float:
    """When this process started, on the ``time.monotonic()`` clock.

    The budget must cover what ``timeout`` in the Makefile counts, which starts
    before Python does. Linux gives the process's start time (clock ticks since
    boot, ``/proc/self/stat`` field 22) and the time since boot
    (``CLOCK_BOOTTIME``); elsewhere the moment this module is loaded, before
    anything heavy, is close enough.
    """
    now = time.monotonic()
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - age if 0.0 <= age < 600.0 else now  # anything else is not a fresh process: do not trust it


STARTED = _process_start()

# The Makefile runs this under `timeout -k 10 470`: the budget, plus stopping the step that
# runs when it ends (GRACE_S, then up to KILL_WAIT_S), plus the summary, must end before that.
BUDGET_S = 450.0
GRACE_S = 5.0  # between SIGTERM and SIGKILL: torchrun's agent needs a moment to stop its ranks
KILL_WAIT_S = 3.0  # for processes to be gone after SIGKILL (one stuck in a driver call may take longer)
MIN_STEP_S = 10.0  # a step is not started with less than this left of the budget
TAIL_LINES = 15


@dataclass
class Outcome:
    """One step's verdict and what to show of it.

    ``status`` is ``pass``, ``fail`` (non-zero exit, or past the step's own
    cap), ``cut`` (stopped because the check's budget ran out or the check was
    signalled) or ``skip`` (never started). ``failures`` are pytest's
    ``FAILED``/``ERROR`` lines and ``tail`` the last lines of the log, both kept
    for failed and cut steps; ``log`` is the log file's path.
    """

    name: str
    status: str
    seconds: float = 0.0
    figures: List[str] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)
    tail: List[str] = field(default_factory=list)
    log: str = ""


# -- the steps that run inside a child process ---------------------------------------------------
# Each prints lines "FIGURE: ..." (shown in the summary) and exits 0 on pass, 1 on fail.


def _figure(text: str) -> None:
    print(f"FIGURE: {text}", flush=True)


def child_probe() -> int:
    """The driver's view of the machine, from a child so that a hang in CUDA start-up cannot hang the driver.

    Prints ``ENV: ...`` lines; exits 3 without torch and 4 without CUDA.
    """
    try:
        import torch
    except ImportError:
        return 3
    if not torch.cuda.is_available():
        return 4
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"card:   {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
        f"{torch.cuda.device_count()} visible",
        f"torch:  {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",  # type: ignore[no-untyped-call]
    ]
    for line in lines:
        print(f"ENV: {line}", flush=True)
    return 0


def _synchronizer(devices: Sequence[str]) -> Callable[[], None]:
    """``torch.cuda.synchronize`` when a device is a GPU, else nothing: the timed helpers also run on CPU (tests)."""
    import torch

    if any(torch.device(d).type == "cuda" for d in devices):
        return torch.cuda.synchronize
    return lambda: None


def step_mixed() -> int:
    import copy

    import torch
    from torch import nn

    from gpipe_bench.pipe import GPipe

    ok = True
    for devices in (["cpu", "cuda:0"], ["cuda:0", "cpu"]):
        torch.manual_seed(0)
        plain = nn.Sequential(
            nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 8)
        ).double()
        gpipe = GPipe(copy.deepcopy(plain), [3, 2], devices=devices, chunks=4, checkpoint="except_last")
        x = torch.randn(32, 16, dtype=torch.float64, device=devices[0], requires_grad=True)
        out = gpipe(x)
        torch.autograd.backward(out.square().sum())
        torch.cuda.synchronize()
        xr = x.detach().cpu().requires_grad_()
        ref = torch.cat([plain(piece) for piece in xr.chunk(4)])
        torch.autograd.backward(ref.square().sum())
        assert x.grad is not None and xr.grad is not None
        errors = [(out.detach().cpu() - ref.detach()).abs().max().item(), (x.grad.cpu() - xr.grad).abs().max().item()]
        for p, q in zip(gpipe.parameters(), plain.parameters()):
            assert p.grad is not None and q.grad is not None
            errors.append((p.grad.cpu() - q.grad).abs().max().item())
        worst = max(errors)
        ok = ok and worst < 1e-9
        _figure(f"{devices}: largest difference to the plain model {worst:.2e} (bound 1e-9)")
    return 0 if ok else 1


def mixed_timed(devices: Sequence[str], chunks: int = 8, micro: int = 16, repeats: int = 5) -> Tuple[bool, List[str]]:
    """Check, then time, training steps of a small float64 model over ``devices``.

    The check: one forward and backward (mean cross-entropy) against the plain
    model run on the host over the same micro-batches (per micro-batch, so that
    BatchNorm sees the same batches), every gradient within 1e-9. The timing:
    zero_grad, forward, backward and an SGD step, synchronised before and after,
    two warm-up steps then the median (and min-max) of ``repeats``. A GPU
    device twice around the host exercises one worker serving two partitions
    with host hops in between, a path the plain CUDA runs do not take.
    """
    import copy
    import statistics

    import torch
    from torch import nn

    from gpipe_bench.pipe import GPipe

    sync = _synchronizer(devices)
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Linear(64, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    ).double()
    gpipe = GPipe(copy.deepcopy(plain), [3, 2, 3], devices=list(devices), chunks=chunks, checkpoint="except_last")
    x = torch.randn(chunks * micro, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (chunks * micro,))
    xg, yg = x.to(gpipe.devices[0]), y.to(gpipe.devices[-1])

    loss = torch.nn.functional.cross_entropy(gpipe(xg), yg)
    torch.autograd.backward(loss)
    sync()
    ref = torch.nn.functional.cross_entropy(torch.cat([plain(piece) for piece in x.chunk(chunks)]), y)
    torch.autograd.backward(ref)
    errors = [abs(loss.item() - ref.item())]
    for p, q in zip(gpipe.parameters(), plain.parameters()):
        assert p.grad is not None and q.grad is not None
        errors.append((p.grad.cpu() - q.grad).abs().max().item())
    worst = max(errors)
    ok = worst < 1e-9

    optimizer = torch.optim.SGD(gpipe.parameters(), lr=0.01)

    def step() -> None:
        optimizer.zero_grad()
        torch.autograd.backward(torch.nn.functional.cross_entropy(gpipe(xg), yg))
        optimizer.step()

    for _ in range(2):
        step()
    times: List[float] = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    figures = [
        f"{list(devices)}: gradients' largest difference to the plain model {worst:.2e} (bound 1e-9)",
        f"{list(devices)}, {chunks} micro-batches of {micro}, float64: training step median "
        f"{statistics.median(times) * 1e3:.1f} ms (min-max {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}) "
        f"over {repeats} after 2 warm-up",
    ]
    return ok, figures


def step_mixed_timed() -> int:
    ok, figures = mixed_timed(["cuda:0", "cpu", "cuda:0"])
    for line in figures:
        _figure(line)
    return 0 if ok else 1


def _count_syncs(chunks: int, devices: Sequence[str]) -> int:
    import warnings

    import torch
    from torch import nn

    from gpipe_bench.pipe import GPipe

    torch.manual_seed(0)
    model = nn.Sequential(
        *[layer for _ in range(4) for layer in (nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU())],
        nn.Linear(256, 10),
    )
    gpipe = GPipe(model, [7, 6], devices=list(devices), chunks=chunks, checkpoint="except_last")
    optimizer = torch.optim.SGD(gpipe.parameters(), lr=0.1)
    x = torch.randn(chunks * 8, 256, device=gpipe.devices[0])
    y = torch.randint(0, 10, (chunks * 8,), device=gpipe.devices[-1])

    def step() -> None:
        optimizer.zero_grad()
        torch.autograd.backward(torch.nn.functional.cross_entropy(gpipe(x), y))
        optimizer.step()

    step()  # warm-up: lazy initialisation is not the engine's per-step cost
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum(1 for w in caught if "synchroniz" in str(w.message))


def step_syncs() -> int:
    devices = ["cuda:0", "cuda:0"]
    few, many = _count_syncs(4, devices), _count_syncs(16, devices)
    _figure(f"host syncs per training step on {devices}: {few} at 4 micro-batches, {many} at 16 (target: equal)")
    return 0 if many == few else 1


def busy_seconds(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals in microseconds, in seconds.

    Kernels on different streams overlap; summing their durations would count
    the overlap twice, and "busy" means at least one kernel running.
    """
    busy, until = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > until:
            busy += b - max(a, until)
            until = b
    return busy / 1e6


def profile_figures(
    model: nn.Sequential,
    balance: Sequence[int],
    devices: Sequence[str],
    micro: int,
    chunks: int,
    sample: Sequence[int],
    classes: int,
    label: str,
    repeats: int = 3,
) -> List[str]:
    """Wall, GPU-busy and host times of a GPipe training step, and the plain model's host time beside it.

    Three figures, each from the run that measures it without distortion:

    - wall time and the engine's host time per cell: steps with no profiler
      (median over ``repeats``), observed with :func:`~gpipe_bench.pipe.observing`
      (one small record per cell). The profiler records every operator on
      the host, which inflates host time and so the wall time of a host-bound
      step.
    - GPU-busy time: the union of the kernels' (and copies') device intervals
      of one step under the profiler. Those are device timestamps, which the
      profiler's host-side cost does not stretch; divided by the unprofiled
      wall time it is the fraction of a real step the GPU is busy (noise can
      take it slightly past 100 %).
    - host time per micro-batch: for the engine, the sum of its cells' host time
      (forward, recompute, backward) over a step, divided by the micro-batches;
      for the plain model (the same model whole on the first device, gradient
      accumulation over the same micro-batches), the time its forward and
      backward calls take to return, with no synchronisation inside, divided by
      the micro-batches. Both are issue time: when the GPU falls behind and the
      launch queue fills up, a call waits, in both alike.

    ``model`` is partitioned in place; the plain model is a copy taken first.
    """
    import copy
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile

    from gpipe_bench.pipe import GPipe, Observer, StepRecord, observing

    class Cells(Observer):
        def __init__(self) -> None:
            self.records: List[StepRecord] = []

        def step(self, record: StepRecord) -> None:
            self.records.append(record)

    sync = _synchronizer(devices)
    plain = copy.deepcopy(model).to(devices[0])
    gpipe = GPipe(model, list(balance), devices=list(devices), chunks=chunks, checkpoint="except_last")
    optimizer = torch.optim.SGD(gpipe.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(micro * chunks, *sample, device=gpipe.devices[0])
    y = torch.randint(0, classes, (micro * chunks,), device=gpipe.devices[-1])

    def step() -> None:
        optimizer.zero_grad()
        torch.autograd.backward(torch.nn.functional.cross_entropy(gpipe(x), y))
        optimizer.step()

    for _ in range(2):
        step()
    sync()
    walls: List[float] = []
    engine_host: List[float] = []
    per_kind: Dict[str, List[float]] = defaultdict(list)
    for _ in range(repeats):
        cells = Cells()
        with observing(cells):
            sync()
            start = time.perf_counter()
            step()
            sync()
            walls.append(time.perf_counter() - start)
        engine_host.append(sum(r.host_ns for r in cells.records) / 1e9 / chunks)
        for r in cells.records:
            per_kind[r.kind].append(r.host_ns / 1e6)
    wall = statistics.median(walls)

    cuda = any(torch.device(d).type == "cuda" for d in devices)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    busy = busy_seconds(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    )

    plain_x, plain_y = x.to(devices[0]).chunk(chunks), y.to(devices[0]).chunk(chunks)

    def accumulate() -> None:
        for xc, yc in zip(plain_x, plain_y):
            torch.autograd.backward(torch.nn.functional.cross_entropy(plain(xc), yc) / chunks)

    accumulate()  # warm-up (allocator, cuDNN's choices)
    plain_host: List[float] = []
    for _ in range(repeats):
        plain.zero_grad()
        sync()
        start = time.perf_counter()
        accumulate()
        plain_host.append((time.perf_counter() - start) / chunks)
        sync()

    figures = [
        f"{label}: step {wall * 1e3:.0f} ms without the profiler (median of {repeats}); GPU busy {busy / wall:.1%} "
        f"of it (kernel time of a profiled step / that wall time)",
        f"host time per micro-batch: engine {statistics.median(engine_host) * 1e3:.2f} ms (its cells' host time, "
        f"recompute included, / {chunks}), plain model {statistics.median(plain_host) * 1e3:.2f} ms "
        f"(forward and backward calls returning, gradient accumulation)",
    ]
    for kind in ("forward", "recompute", "backward"):
        times = per_kind.get(kind, [])
        if times:
            figures.append(
                f"engine host time per {kind} cell: median {statistics.median(times):.2f} ms, "
                f"max {max(times):.2f} ms over {len(times)} cells ({repeats} steps)"
            )
    return figures


def step_profile() -> int:
    import torch

    from gpipe_bench import models

    micro, chunks = 16, 32
    torch.manual_seed(0)
    model = models.build("resnet101", num_classes=1000)
    label = f"ResNet-101 pipeline-2 on cuda:0*2, {chunks} micro-batches of {micro} at 224x224"
    for line in profile_figures(model, [140, 230], ["cuda:0", "cuda:0"], micro, chunks, (3, 224, 224), 1000, label):
        _figure(line)
    return 0


STEPS_IN_CHILD: Dict[str, Callable[[], int]] = {
    "probe": child_probe,
    "mixed": step_mixed,
    "mixed-timed": step_mixed_timed,
    "syncs": step_syncs,
    "profile": step_profile,
}


# -- processes: finding, stopping and reaping everything a step started --------------------------

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux); False where that is not possible.

    A step's processes that outlive their parent (torchrun's ranks when its
    agent dies) are then re-parented to the driver instead of init, so a walk
    of the ``/proc`` parent links from the driver finds them, and the driver
    collects their exit status (no zombies left).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def is_subreaper() -> bool:
    """Whether this process is a child subreaper (asked of the kernel, so no state to keep in step)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        flag = ctypes.c_int(0)
        return int(libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)) == 0 and flag.value != 0
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class Proc:
    """One line of ``/proc/PID/stat``, the fields that place a process in a step's tree."""

    pid: int
    ppid: int
    pgrp: int
    session: int
    state: str
    start: int  # clock ticks since boot; with the pid it names one process, as pids are reused


def _stat(pid: int) -> Optional[Proc]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        rest = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
        return Proc(pid, int(rest[1]), int(rest[2]), int(rest[3]), rest[0], int(rest[19]))
    except (ValueError, IndexError):
        return None


def _processes() -> List[Proc]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return []  # not Linux: the process group is all we can reach
    return [p for p in (_stat(int(n)) for n in names if n.isdigit()) if p is not None]


def step_processes(leader: int, subreaper: bool) -> Dict[int, Proc]:
    """Every live process of the step whose first process (session and group leader) is ``leader``.

    That is the leader's descendants, the members of its session and group
    (orphans among them may have been re-parented elsewhere), and, when this
    process is a subreaper, all of this process's descendants: the driver runs
    nothing else, so whatever it adopted came from a step.
    """
    me = os.getpid()
    procs = _processes()
    children: Dict[int, List[Proc]] = defaultdict(list)
    for p in procs:
        children[p.ppid].append(p)
    found = {p.pid: p for p in procs if leader in (p.session, p.pgrp) and p.pid != me}
    stack = [leader] + ([me] if subreaper else [])
    while stack:
        for child in children.get(stack.pop(), []):
            if child.pid not in found and child.pid != me:
                found[child.pid] = child
                stack.append(child.pid)
    return {pid: p for pid, p in found.items() if p.state != "Z"}


def _alive(p: Proc) -> bool:
    now = _stat(p.pid)
    return now is not None and now.start == p.start and now.state != "Z"


def _kill(procs: Iterable[Proc], sig: int) -> None:
    for p in procs:
        if _alive(p):  # the same process still, not a new one under a reused pid
            try:
                os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _killpg(child: subprocess.Popen[bytes], sig: int) -> None:
    # Only while the leader is unreaped: until then its pid, hence the group id, cannot be reused.
    if child.returncode is None:
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _reap(procs: Iterable[Proc], leader: int, subreaper: bool) -> None:
    """Collect the exit status of our children that are done, other than the leader, so none stays a zombie.

    Those are ``procs`` that were re-parented to us and, for a subreaper,
    every zombie child (the driver starts nothing else, so each was adopted
    from a step, maybe one that had ended long before). Never the leader: its
    status belongs to its ``Popen``, which would read a status collected here
    as exit code 0.
    """
    me = os.getpid()
    pids = {p.pid for p in procs}
    if subreaper:
        pids |= {p.pid for p in _processes() if p.ppid == me}
    for pid in sorted(pids - {leader}):
        now = _stat(pid)
        if now is not None and now.ppid == me and now.state == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def kill_all(
    child: subprocess.Popen[bytes], known: Mapping[int, Proc], subreaper: bool, wait_s: float = KILL_WAIT_S
) -> List[str]:
    """SIGKILL the step's group and every process of the step, wait (bounded) until they are gone, reap them.

    ``known`` are processes found before an earlier signal (some may since have
    left the tree); they are killed too when they are still the same processes.
    Returns notes for the summary about any process that would not die (a
    process stuck in the kernel, e.g. in a GPU driver call, ignores SIGKILL
    until it returns).
    """
    targets = {**known, **step_processes(child.pid, subreaper)}
    _killpg(child, signal.SIGKILL)
    _kill(targets.values(), signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    try:
        child.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        pass
    while True:
        _reap(targets.values(), child.pid, subreaper)
        alive = sorted(p.pid for p in targets.values() if p.pid != child.pid and _alive(p))
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    notes = []
    if child.poll() is None:
        notes.append(f"process {child.pid} did not exit after SIGKILL")
    if alive:
        notes.append(f"still alive after SIGKILL: pid {', '.join(map(str, alive))}")
    return notes


def stop(child: subprocess.Popen[bytes], grace_s: float, subreaper: bool) -> List[str]:
    """Stop a running step: SIGTERM its group, up to ``grace_s`` for it to go, then :func:`kill_all`.

    The processes are listed before the SIGTERM: a torchrun agent that exits
    at once would otherwise orphan ranks that, without a subreaper, nothing
    leads back to.
    """
    known = step_processes(child.pid, subreaper)
    _killpg(child, signal.SIGTERM)
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    return kill_all(child, known, subreaper)


@dataclass
class Run:
    """How a child process ended: ``returncode`` (None if it never exited), why it was stopped, notes."""

    returncode: Optional[int]
    stopped: str  # "": ran to its end; "time": past its limit; else the signal that stopped the check
    seconds: float
    notes: List[str]


def run_process(
    argv: Sequence[str],
    log: Path,
    limit_s: float,
    *,
    grace_s: float = GRACE_S,
    stopped: Callable[[], Optional[str]] = lambda: None,
    env: Optional[Mapping[str, str]] = None,
) -> Run:
    """Run ``argv`` in a session of its own, output to ``log``, for at most ``limit_s`` seconds.

    Output goes to a file, not a pipe: a grandchild holding a pipe open would
    keep a reader waiting after its parent died. The wait polls, so a signal
    the driver receives (``stopped()`` then names it) stops the child at once.
    Whatever the step leaves running after it ends is killed too.
    """
    subreaper = is_subreaper()
    started = time.monotonic()
    with open(log, "wb") as out:
        out.write(f"gpu-check: {' '.join(argv)}\n".encode())
        out.flush()
        child = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    why = ""
    while True:
        try:
            child.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            pass
        signalled = stopped()
        if signalled:
            why = signalled
        elif time.monotonic() - started >= limit_s:
            why = "time"
        if why:
            notes = stop(child, grace_s, subreaper)
            return Run(child.returncode, why, time.monotonic() - started, notes)
    seconds = time.monotonic() - started
    notes = []
    left = step_processes(child.pid, subreaper)
    if left:
        notes = [f"killed {len(left)} process(es) the step left running: pid {', '.join(map(str, sorted(left)))}"]
        notes += kill_all(child, left, subreaper)
    else:
        _reap([], child.pid, subreaper)  # what the step started and that ended after it
    return Run(child.returncode, "", seconds, notes)


# -- the driver ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: float
    command: Callable[[str, Path], List[str]]  # (python, scratch dir) -> argv
    figures: Callable[[str], List[str]]  # the step's log -> lines for the summary


def _own(name: str) -> Callable[[str, Path], List[str]]:
    return lambda py, scratch: [py, str(Path(__file__).resolve()), "--child", name]


def _cli(*args: str) -> Callable[[str, Path], List[str]]:
    return lambda py, scratch: [py, "-m", "gpipe_bench.cli", *args, "--output", str(scratch / "results")]


def _tagged(out: str) -> List[str]:
    return [line[len("FIGURE: ") :] for line in out.splitlines() if line.startswith("FIGURE: ")]


def _pytest_summary(out: str) -> List[str]:
    lines = [line.strip("= ") for line in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return lines[-1:]


def _table(out: str) -> List[str]:
    """The rendered table's rows (between rst rules), as printed by the command."""
    keep = [line for line in out.splitlines() if re.match(r"^(naive|pipeline|Experiment)", line)]
    return keep[:12]


def _ratios(out: str) -> List[str]:
    """The ratio rows of engine.py's second table: ``(x)/(y) ...`` or ``(x) ... vs ...``, at most 8.

    Matched loosely on purpose: the rows of that table change as workloads are
    added, and a figure that is not found is better than a step that fails.
    """
    keep = [
        line.rstrip()
        for line in out.splitlines()
        if line.startswith("(") and (re.match(r"^\([^)\s]*\)\s*/\s*\(", line) or " vs " in line)
    ]
    return keep[:8]


def failed_tests(log: str) -> List[str]:
    """The failed tests of a pytest log: its short summary (``-rfE``) and the test pytest-timeout stopped.

    ``FAILED path::test - reason`` and ``ERROR path...`` come from the short
    summary. A timeout with ``--timeout-method=thread`` ends pytest at once,
    with no summary; with ``-v`` the test's id is on the line where the
    timeout's banner starts, so that line names it.
    """
    found = []
    for line in log.splitlines():
        if re.match(r"^(FAILED|ERROR) \S+\.py\b", line):
            found.append(line.rstrip()[:240])
        stuck = re.match(r"^(\S+\.py::\S+) \++ Timeout \++", line)
        if stuck:
            found.append(f"TIMEOUT {stuck.group(1)} (pytest-timeout; every thread's stack is in the log)")
    return found[:20]


def tail(log: str, lines: int = TAIL_LINES) -> List[str]:
    return [line.rstrip()[:240] for line in log.splitlines() if line.strip()][-lines:]


def _cuda_test_files() -> List[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if "mark.cuda" in p.read_text())


STEPS: List[Step] = [
    Step(
        "tests",
        200,
        lambda py, scratch: [
            py,
            "-m",
            "pytest",
            "-v",  # each test's id before it runs: a test that hangs is named on the timeout's line
            "-rfEs",  # failed and errored test ids (for the summary) and skip reasons; replaces addopts' -ra
            "-m",
            "cuda",
            "-p",
            "timeout",
            "--timeout",
            "120",
            "--timeout-method=thread",  # on a timeout, every thread's stack (also one stuck in C++)
            "-p",
            "no:cacheprovider",
            *_cuda_test_files(),
        ],
        _pytest_summary,
    ),
    Step("mixed", 60, _own("mixed"), _tagged),
    Step("mixed-timed", 60, _own("mixed-timed"), _tagged),
    Step("syncs", 60, _own("syncs"), _tagged),
    Step("profile", 150, _own("profile"), _tagged),
    Step("speed", 150, _cli("speed", "resnet101", "--profile", "quick", "--devices", "cuda:0*8", "--quiet"), _table),
    Step(
        "memory",
        120,
        _cli("memory", "amoebanetd", "--profile", "quick", "--devices", "cuda:0*8", "--per-device", "--quiet"),
        _table,
    ),
    Step(
        "distributed",
        150,
        lambda py, scratch: [
            py,
            "-m",
            "gpipe_bench.cli",
            "launch",
            "--nproc",
            "1",
            "--",
            "speed",
            "resnet101",
            "--pipeline",
            "2",
            "--engine",
            "distributed",
            "--schedule",
            "interleaved",
            "--profile",
            "quick",
            "--quiet",
            "--output",
            str(scratch / "results"),
        ],
        _table,
    ),
    Step(
        "engine",
        120,
        lambda py, scratch: [
            py,
            str(ROOT / "benchmarks" / "engine.py"),
            "--device",
            "cuda",
            "--repeats",
            "3",
            "--quiet",
        ],
        _ratios,
    ),
]


def _child_env() -> Dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )


def run_step(
    step: Step,
    python: str,
    out: Path,
    scratch: Path,
    left_s: float,
    *,
    min_s: float = MIN_STEP_S,
    grace_s: float = GRACE_S,
    stopped: Callable[[], Optional[str]] = lambda: None,
) -> Outcome:
    """Run one step, its log in ``out/NAME.log``, for at most its cap or ``left_s`` (what is left of the budget).

    Past its own cap a step fails; stopped by the budget (``left_s`` was the
    shorter) or by a signal to the check, it is cut; with under ``min_s`` left
    it is skipped.
    """
    if left_s < min_s:
        return Outcome(step.name, "skip", figures=["not run: the check's time budget is spent"])
    log = out / f"{step.name}.log"
    limit = min(step.cap_s, left_s)
    run = run_process(step.command(python, scratch), log, limit, grace_s=grace_s, stopped=stopped, env=_child_env())
    text = log.read_text(errors="replace")
    figures = step.figures(text)
    if run.stopped == "time" and limit < step.cap_s:
        status = "cut"
        figures.append(f"cut (budget): stopped after {limit:.0f} s, when the check's time budget ran out")
    elif run.stopped == "time":
        status = "fail"
        figures.append(f"timed out after {limit:g} s (its cap)")
    elif run.stopped:
        status = "cut"
        figures.append(f"cut ({run.stopped}): stopped after {run.seconds:.0f} s, the check was stopped")
    elif run.returncode != 0:
        status = "fail"
        figures.append(f"exit code {run.returncode}")
    else:
        status = "pass"
    figures += run.notes
    outcome = Outcome(step.name, status, run.seconds, figures, log=str(log))
    if status in ("fail", "cut"):
        outcome.failures = failed_tests(text)
        outcome.tail = tail(text)
    return outcome


def summary(header: Sequence[str], outcomes: Sequence[Outcome]) -> str:
    lines = ["gpu-check", *header, ""]
    for o in outcomes:
        lines.append(f"{o.status.upper():4}  {o.name:<12} {o.seconds:6.1f} s")
        lines += [f"      {f}" for f in o.figures]
        lines += [f"      {f}" for f in o.failures]
        if o.tail:
            lines.append(f"      last lines of {o.log}:")
            lines += [f"      | {t}" for t in o.tail]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("pass", "fail", "cut", "skip")}
    last = f"gpu-check: {counts['pass']} passed, {counts['fail']} failed"
    last += f", {counts['cut']} cut" if counts["cut"] else ""
    last += f", {counts['skip']} skipped" if counts["skip"] else ""
    return "\n".join(lines + ["", last])


def _write(path: Path, text: str) -> None:
    """Replace ``path`` whole: a kill while writing leaves the previous version, not half a file."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def write_summary(out: Path, header: Sequence[str], outcomes: Sequence[Outcome], pending: Sequence[str]) -> str:
    """Write ``summary.txt`` and ``summary.json`` (with the steps still to run, when some are); return the text."""
    text = summary(header, outcomes)
    note = f"\n(still running: {', '.join(pending)} to go)" if pending else ""
    _write(out / "summary.txt", text + note + "\n")
    data = {"environment": list(header), "steps": [asdict(o) for o in outcomes], "pending": list(pending)}
    _write(out / "summary.json", json.dumps(data, indent=2) + "\n")
    return text


def choose_out(given: str, env: Mapping[str, str]) -> Path:
    """The output folder: ``--out``, else env ``GPU_CHECK_OUT``, else env ``OUT``, else a new temporary folder.

    ``OUT`` comes before a temporary folder because a lent machine hands back
    what is written there: the logs then come back with the summary.
    """
    for value in (given, env.get("GPU_CHECK_OUT", ""), env.get("OUT", "")):
        if value:
            return Path(value)
    return Path(tempfile.mkdtemp(prefix="gpu-check-"))


def _json_steps(path: str) -> List[Step]:
    """Steps from a JSON list of ``{"name", "cap_s", "argv"}`` (``{python}`` in argv is the interpreter).

    For the driver's own tests: it runs them with no torch and no CUDA probe.
    """

    def command(argv: List[str]) -> Callable[[str, Path], List[str]]:
        return lambda py, scratch: [a.replace("{python}", py) for a in argv]

    items = json.loads(Path(path).read_text())
    return [Step(str(i["name"]), float(i["cap_s"]), command([str(a) for a in i["argv"]]), _tagged) for i in items]


def probe(python: str, limit_s: float, stopped: Callable[[], Optional[str]]) -> Tuple[int, List[str]]:
    """Run :func:`child_probe`: ``(exit code, ENV lines)``, or ``(-1, last lines of its output)`` when it was stopped."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-probe-") as scratch:
        log = Path(scratch) / "probe.log"
        run = run_process(
            [python, str(Path(__file__).resolve()), "--child", "probe"], log, limit_s, stopped=stopped, env=_child_env()
        )
        text = log.read_text(errors="replace")
    if run.stopped:
        return -1, [f"stopped after {run.seconds:.0f} s ({run.stopped})", *tail(text, 5)]
    if run.returncode == 0:
        return 0, [line[len("ENV: ") :] for line in text.splitlines() if line.startswith("ENV: ")]
    return run.returncode if run.returncode is not None else -1, tail(text, 5)


def main(argv: Optional[Sequence[str]] = None, started: float = STARTED) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default="", help="comma-separated steps to run (default: all): " + ", ".join(s.name for s in STEPS)
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=BUDGET_S,
        help=f"seconds for the whole check, counted from the start of the process (default: {BUDGET_S:.0f})",
    )
    parser.add_argument(
        "--out",
        default="",
        help="folder for the steps' logs, summary.txt and summary.json (default: env GPU_CHECK_OUT, "
        "else env OUT, else a new temporary folder)",
    )
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    # For the driver's own tests: fake steps, a shorter minimum and grace.
    parser.add_argument("--steps-json", default="", help=argparse.SUPPRESS)
    parser.add_argument("--min-step", type=float, default=MIN_STEP_S, help=argparse.SUPPRESS)
    parser.add_argument("--grace", type=float, default=GRACE_S, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        return STEPS_IN_CHILD[args.child]()

    deadline = started + args.budget
    signals: List[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if not signals:
            signals.append(signum)

    def stopped() -> Optional[str]:
        return signal.Signals(signals[0]).name if signals else None

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    become_subreaper()

    steps = _json_steps(args.steps_json) if args.steps_json else STEPS
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {s.name for s in steps})
    if unknown:
        print(
            f"gpu-check: unknown step {', '.join(unknown)}; choose from {', '.join(s.name for s in steps)}",
            file=sys.stderr,
        )
        return 2

    if args.steps_json:
        header: List[str] = []
    else:
        code, lines = probe(sys.executable, min(120.0, deadline - time.monotonic()), stopped)
        if code == 3:
            print(
                "gpu-check: torch is not importable by this Python; run with PY=/path/to/python that has it",
                file=sys.stderr,
            )
            return 2
        if code == 4:
            print("gpu-check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
            return 2
        if code != 0 and signals:
            print(f"gpu-check: stopped ({stopped()}) while probing torch and CUDA", file=sys.stderr)
            return 128 + signals[0]
        if code != 0:
            print("gpu-check: probing torch and CUDA failed:", *lines, sep="\n  ", file=sys.stderr)
            return 1
        header = lines
    header += [
        f"python: {sys.executable} {sys.version.split()[0]}",
        f"date:   {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
    ]

    out = choose_out(args.out, os.environ)
    out.mkdir(parents=True, exist_ok=True)
    header.append(f"out:    {out} (steps' logs, summary.txt, summary.json)")
    print("\n".join(header), flush=True)

    selected = [s for s in steps if not wanted or s.name in wanted]
    outcomes: List[Outcome] = []
    write_summary(out, header, outcomes, [s.name for s in selected])
    for n, step in enumerate(selected):
        if signals:
            outcome = Outcome(step.name, "skip", figures=[f"not run: the check was stopped ({stopped()})"])
        else:
            print(f"gpu-check: {step.name} ...", flush=True)
            outcome = run_step(
                step,
                sys.executable,
                out,
                out,
                deadline - time.monotonic(),
                min_s=args.min_step,
                grace_s=args.grace,
                stopped=stopped,
            )
            print(f"gpu-check: {step.name} {outcome.status} ({outcome.seconds:.1f} s)", flush=True)
        outcomes.append(outcome)
        write_summary(out, header, outcomes, [s.name for s in selected[n + 1 :]])
    text = write_summary(out, header, outcomes, [])
    print("\n" + text, flush=True)
    if signals:
        return 128 + signals[0]
    return 0 if all(o.status in ("pass", "skip") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
