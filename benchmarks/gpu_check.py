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
  :mod:`gpipe_bench.processes` does all of this (standard library only).
- On SIGTERM (what ``timeout`` sends), SIGINT or SIGHUP the driver stops the
  running step the same way, prints the summary so far, writes its files and
  exits non-zero. ``summary.txt`` and ``summary.json`` are also rewritten
  after every step, so even a SIGKILL loses only the step that was running.
- A failed or cut step shows its failed test ids (pytest's ``FAILED``/``ERROR``
  lines) and the last lines of its log in the summary.

This file is the driver: the steps, their caps and verdicts, the summary. The
steps that are Python functions (the probe, ``mixed``, ``mixed-timed``,
``syncs``, ``profile``) are in ``gpu_steps.py`` beside it; the driver runs
each as ``gpu_check.py --child NAME`` and never imports them itself.

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
- ``engine``: the engine micro-benchmark on ``cuda:0`` (plain model vs our
  GPipe vs torchgpipe where installed): the GPU-bound stack, then the
  host-bound suite (369 tiny layers, 32 micro-batches of 2, ``['cuda:0'] * 8``),
  where what the engine adds per cell shows; its ratio rows are shown. It runs
  before the tables so that the budget cuts those first.
- ``speed``: the quick ResNet-101 speed table on ``cuda:0*8``.
- ``memory``: the quick AmoebaNet-D memory table on ``cuda:0*8``, per device.
- ``distributed``: the distributed engine on CUDA: one NCCL process holding
  both stages of ``pipeline-2`` (interleaved schedule; one GPU cannot host two
  NCCL ranks).

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
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run without PYTHONPATH=.: this working tree's package all the same, as the steps get
    sys.path.insert(0, str(ROOT))

from gpipe_bench.processes import GRACE_S, become_subreaper, run_process  # noqa: E402


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
# runs when it ends (GRACE_S, then up to processes.KILL_WAIT_S), plus the summary, must end before that.
BUDGET_S = 450.0
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
    return lambda py, scratch: [py, "-m", "gpipe_bench.cli", *args, "--results", str(scratch / "results")]


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
    """The ratio rows of engine.py's ratio tables: ``(x)/(y) ...`` or ``(x) ... vs ...``, at most 12.

    Matched loosely on purpose: the rows of that table change as workloads are
    added, and a figure that is not found is better than a step that fails.
    """
    keep = [
        line.rstrip()
        for line in out.splitlines()
        if line.startswith("(") and (re.match(r"^\([^)\s]*\)\s*/\s*\(", line) or " vs " in line)
    ]
    return keep[:12]


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
            "--results",
            str(scratch / "results"),
        ],
        _table,
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
    run = run_process(
        step.command(python, scratch),
        log,
        limit,
        grace_s=grace_s,
        stopped=stopped,
        env=_child_env(),
        cwd=ROOT,
        label="gpu-check",
    )
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
    """Run ``gpu_steps.child_probe``: ``(exit code, ENV lines)``, or ``(-1, last lines of its output)`` when it was stopped."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-probe-") as scratch:
        log = Path(scratch) / "probe.log"
        run = run_process(
            [python, str(Path(__file__).resolve()), "--child", "probe"],
            log,
            limit_s,
            stopped=stopped,
            env=_child_env(),
            cwd=ROOT,
            label="gpu-check",
        )
        text = log.read_text(errors="replace")
    if run.stopped:
        return -1, [f"stopped after {run.seconds:.0f} s ({run.stopped})", *tail(text, 5)]
    if run.returncode == 0:
        return 0, [line[len("ENV: ") :] for line in text.splitlines() if line.startswith("ENV: ")]
    return run.returncode if run.returncode is not None else -1, tail(text, 5)


def run_in_child(name: str) -> int:
    """Run the step ``name`` of ``gpu_steps.py``: this process is the child the driver started for it.

    Imported here, not at the top: the driver itself never loads the steps
    (nor, through them, torch). ``gpu_steps.py`` lies beside this file, whose
    folder is on ``sys.path`` when it runs as a script, unless Python was told
    not to put it there (``-P``, ``PYTHONSAFEPATH``); so it is put there.
    """
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from gpu_steps import STEPS_IN_CHILD

    return STEPS_IN_CHILD[name]()


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
        return run_in_child(args.child)

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
