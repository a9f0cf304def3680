"""``gpipe-bench launch``: torchrun's elastic agent in this process, and one report of the first failure.

Why not just exec torchrun: when one rank raises, the others are stuck in a
send or receive; torchrun stops them, then prints every rank's traceback and
its own summary (a hundred lines for one error, with the cause in the middle).
Here each worker records its error (:func:`worker_main`) instead of printing
it, the agent runs in this process with its logging quietened, and when a
rank fails the launch prints the error of the rank that failed first, once:

* a rank that raised: its traceback (or, for a usage error, its one line);
* a rank that ended without a Python error (killed by a signal, the kernel's
  out-of-memory killer, a crash in native code): which rank, and how it ended.

The agent stops the remaining ranks (SIGTERM, then SIGKILL after a grace
period) as soon as it sees the failure, so no rank outlives the launch, and
rank 0 writes a result only after its row completes, so a failed row leaves
no file. Across hosts each host's launch reports its own ranks; a rank that
fails on another host shows here as its peers' lost connection.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from gpipe_bench import signals

__all__ = ["ERROR_DIR_ENV", "Failure", "worker_main", "first_failure", "launch", "rank_threads", "thread_count"]

#: Set by :func:`launch` for its workers: the folder where a failing rank leaves its error.
ERROR_DIR_ENV = "GPIPE_BENCH_ERROR_DIR"
#: Set by :func:`launch` for its workers: its pid, the parent each rank must not outlive.
LAUNCH_PID_ENV = "GPIPE_BENCH_LAUNCH_PID"

_INTERRUPTED = (
    "gpipe-bench launch: interrupted; the ranks were stopped and nothing was written for the row in progress."
)

#: Seconds torchrun's agent waits between checks of its workers.
_MONITOR_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Failure:
    """How one rank failed: ``kind`` is usage (a bad option, exit 2), error (an exception) or died."""

    rank: int
    kind: str
    text: str
    detail: str = ""
    time: float = 0.0

    def report(self, world: Optional[int] = None) -> str:
        """What the launch prints: the traceback once, then one line saying which rank and what it was."""
        if self.kind == "usage":
            return f"Error: {self.text}"
        of = f" of {world}" if world else ""
        verb = "failed" if self.kind == "error" else "died"
        head = f"{self.detail.rstrip()}\n" if self.detail else ""
        hint = (
            "; it waited on a peer longer than the process group's timeout (--timeout): "
            "that peer is hung or much slower"
            if "timed out" in self.text.lower()
            else ""
        )
        return (
            f"{head}gpipe-bench launch: rank {self.rank}{of} {verb} first: {self.text}{hint}; "
            "the other ranks were stopped."
        )


def _record(folder: str, failure: Failure) -> None:
    path = Path(folder) / f"rank{failure.rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(failure.__dict__))
    os.replace(tmp, path)


def worker_main(main: Callable[..., Any]) -> None:
    """Run the click command ``main`` as one rank of a launch: an error is recorded for the launch, not printed.

    Outside :func:`launch` (plain torchrun) the command runs as usual and
    each rank prints its own errors.
    """
    import click

    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        main()
        return
    rank = int(os.environ.get("RANK", "0"))
    # The agent passes Ctrl-C on to every rank; the launch says it once (click would print a line per rank).
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    # A launch killed outright (SIGKILL) cannot stop its ranks: each stops itself when its parent dies.
    launcher = os.environ.get(LAUNCH_PID_ENV)
    signals.die_with_parent(signal.SIGTERM, parent=int(launcher) if launcher else None)
    try:
        main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        _record(folder, Failure(rank, "usage", error.format_message(), time=time.time()))
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - every failure is reported by the launch
        text = f"{type(error).__name__}: {error}".strip()
        _record(
            folder,
            Failure(
                rank,
                "error",
                text.splitlines()[0] if text else type(error).__name__,
                "".join(traceback.format_exception(error)),
                time=time.time(),
            ),
        )
        sys.exit(1)


def _ended(exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (as the kernel's out-of-memory killer does)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}, without a Python error"
    return f"exited with code {exitcode} without a Python error"


def first_failure(folder: str, exitcodes: Dict[int, int]) -> Optional[Failure]:
    """The failure to report, from the recorded errors and the exit codes of the ranks torchrun saw fail.

    A failed rank that recorded nothing died outside Python: nothing of ours
    kills a rank before the failure is seen, so it is the cause, and the
    errors its peers recorded (a closed connection) are consequences. The
    exception is SIGTERM, which the agent itself sends to the ranks still
    running once it sees a failure. Otherwise the earliest recorded error is
    the cause. (A rank stopped by someone else's SIGTERM therefore shows as
    its peers' lost connection.)
    """
    recorded: Dict[int, Failure] = {}
    for path in Path(folder).glob("rank*.json"):
        try:
            data = json.loads(path.read_text())
            recorded[int(data["rank"])] = Failure(**data)
        except (OSError, ValueError, TypeError, KeyError):
            continue
    silent = [(rank, code) for rank, code in sorted(exitcodes.items()) if code != 0 and rank not in recorded]
    # SIGTERM is how the agent stops the ranks still running once it has seen a failure.
    # A rank stopped by it exits 143 (gpipe_bench.signals: SIGTERM ends a run as Ctrl-C does), or dies of it.
    stopped = (-signal.SIGTERM, 128 + signal.SIGTERM)
    died = [Failure(rank, "died", _ended(code)) for rank, code in silent if code not in stopped]
    if died:
        return died[0]
    if recorded:
        return min(recorded.values(), key=lambda f: (f.time, f.rank))
    return Failure(silent[0][0], "died", _ended(silent[0][1])) if silent else None


def _quiet_agent() -> None:
    """torch's elastic loggers each set their own level (LOGLEVEL, WARNING): quieten every one created so far."""
    prefixes = ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(prefixes):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch(torchrun_args: Sequence[str], world: Optional[int] = None) -> int:
    """Run torchrun's agent with ``torchrun_args``; the exit code, after printing the first failure if any."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.agent.server import api  # noqa: F401 - its logger, to quieten
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    folder = tempfile.mkdtemp(prefix="gpipe-bench-launch-")
    os.environ[ERROR_DIR_ENV] = folder
    os.environ[LAUNCH_PID_ENV] = str(os.getpid())
    try:
        _quiet_agent()
        options = [f"--monitor-interval={_MONITOR_INTERVAL_S}", *torchrun_args]
        args = torchrun.parse_args(options)  # type: ignore[no-untyped-call]
        try:
            torchrun.run(args)  # type: ignore[no-untyped-call]
        except ChildFailedError as error:
            codes = {rank: failure.exitcode for rank, failure in error.failures.items()}
            failure = first_failure(folder, codes)
            if failure is None:
                print(f"gpipe-bench launch: ranks {sorted(codes)} failed with exit codes {codes}", file=sys.stderr)
                return 1
            print(failure.report(world), file=sys.stderr)
            return 2 if failure.kind == "usage" else 1
        except (KeyboardInterrupt, SignalException) as stop:  # Ctrl-C, or SIGTERM to the launch
            print(_INTERRUPTED, file=sys.stderr)
            signum = getattr(stop, "sigval", None) or getattr(stop, "signum", None) or signal.SIGINT
            return 128 + int(signum)
        except Exception as error:  # the agent's own failure: rendezvous, a busy port
            print(
                f"gpipe-bench launch: torchrun failed before the ranks ran: {type(error).__name__}: {error}",
                file=sys.stderr,
            )
            return 1
        return 0
    finally:
        os.environ.pop(ERROR_DIR_ENV, None)
        os.environ.pop(LAUNCH_PID_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def rank_threads(nproc: int, cores: int) -> int:
    """Intra-op threads of each of ``nproc`` ranks on ``cores`` cores: shared out, at least one, whatever the device.

    The one rule: the launcher sets it (:func:`thread_count`), and the predictor and
    the planner ask it for the ranks they simulate.
    """
    return max(1, cores // max(1, nproc))


def thread_count(nproc: int) -> int:
    """Intra-op threads per rank of a launch here: this host's usable cores shared out (:func:`rank_threads`)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return rank_threads(nproc, cores)
