"""Run a command under a time limit and make sure nothing it started outlives it.

A *step* here is one command started by :func:`run_process` together with
every process it starts. Stopping a step for good is harder than stopping its
first process, and each rule below answers a way a step was once seen to
escape or to hang its caller:

- torchrun's ranks run in sessions of their own, so a signal to the step's
  process group does not reach them. The step's processes are found by walking
  ``/proc``: the first process's descendants and the members of its session
  and group, listed *before* the first signal, since an agent that exits at
  once orphans its ranks.
- An orphan is re-parented to init, where no walk from the step finds it. A
  caller that is a child subreaper (:func:`become_subreaper`, Linux) adopts
  them instead, so everything it adopted is known to come from a step (such a
  caller runs nothing else), and it collects their exit status: no zombies.
- Output goes to a log file, never a pipe: a stray child holding a pipe's
  write end open blocks a reader forever, after its parent died.
- Stopping is SIGTERM to the group, a grace period (torchrun's agent stops its
  ranks on SIGTERM), then SIGKILL to the group and to every process found, and
  a bounded wait: a process stuck in the kernel (a GPU driver call) ignores
  SIGKILL until it returns, and the caller must still end in time. What would
  not die is reported, not waited for.
- A process is named by its pid *and* its start time, as pids are reused: a
  signal never goes to a new process that took a dead one's pid.
- The wait polls, so that a signal to the caller (``stopped()``) stops the
  step at once, and a step that ends leaving processes running has them killed.

``benchmarks/gpu_check.py`` runs each of its steps with it; anything that
must not leave a child process behind after a run can do the same. It
imports only the standard library, so that a driver that must never import
torch (a hang in CUDA start-up would hang it) can use it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = [
    "GRACE_S",
    "KILL_WAIT_S",
    "Proc",
    "Run",
    "become_subreaper",
    "is_subreaper",
    "kill_all",
    "run_process",
    "step_processes",
    "stop",
]

GRACE_S = 5.0  # between SIGTERM and SIGKILL: torchrun's agent needs a moment to stop its ranks
KILL_WAIT_S = 3.0  # for processes to be gone after SIGKILL (one stuck in a driver call may take longer)

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux); False where that is not possible.

    A step's processes that outlive their parent (torchrun's ranks when its
    agent dies) are then re-parented to this process instead of init, so a walk
    of the ``/proc`` parent links from it finds them, and it collects their
    exit status (no zombies left).
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
    process is a subreaper, all of this process's descendants: it runs nothing
    but steps, so whatever it adopted came from a step.
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
    every zombie child (this process starts nothing but steps, so each was
    adopted from a step, maybe one that had ended long before). Never the
    leader: its status belongs to its ``Popen``, which would read a status
    collected here as exit code 0.
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
    stopped: str  # "": ran to its end; "time": past its limit; else the signal that stopped the caller
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
    cwd: Optional[Path] = None,
    label: str = "run",
) -> Run:
    """Run ``argv`` in a session of its own, output to ``log``, for at most ``limit_s`` seconds.

    The log's first line is ``LABEL: ARGV``. Output goes to a file, not a
    pipe: a grandchild holding a pipe open would keep a reader waiting after
    its parent died. The wait polls, so a signal the caller receives
    (``stopped()`` then names it) stops the child at once. Whatever the step
    leaves running after it ends is killed too. ``cwd`` and ``env`` default to
    this process's.
    """
    subreaper = is_subreaper()
    started = time.monotonic()
    with open(log, "wb") as out:
        out.write(f"{label}: {' '.join(argv)}\n".encode())
        out.flush()
        child = subprocess.Popen(
            list(argv),
            cwd=cwd,
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
