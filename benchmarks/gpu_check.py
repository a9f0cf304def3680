"""Everything a GPU machine should check, in one run that installs nothing: ``make gpu-check``.

Made for a lent GPU box with its own Python (torch preinstalled, no package
index): it uses the interpreter it is run with and the package from the
working tree (``PYTHONPATH=.``), never a virtual environment. Each step runs in
a child process under a timeout, so a hang fails its step and the rest still
run; the whole check keeps to a budget (``--budget``, 450 s by default, under
8 minutes with the start-up). It ends with one screen: the card, torch and
CUDA versions, each step's pass/fail and figures. Without CUDA it exits 2 at
once with one line.

Steps (``--only NAME`` runs some of them):

- ``tests``: the tests marked ``cuda``, each with a 120 s timeout.
- ``mixed``: host and GPU partitions in one pipeline, ``['cpu', 'cuda:0']`` and
  ``['cuda:0', 'cpu']``: forward and backward equal the plain model (float64).
- ``syncs``: one training step under ``torch.cuda.set_sync_debug_mode('warn')``
  at 4 and at 16 micro-batches; the engine's host synchronisations must not
  grow with the micro-batches (target: none per micro-batch).
- ``profile``: one ResNet-101 ``pipeline-2`` step (its balance, micro-batches of
  16 at 224x224, 32 of them) on ``cuda:0*2`` under the profiler: the fraction of
  the step the GPU is busy, and the engine's host time per cell (forward,
  recompute, backward) from :mod:`gpipe_bench.pipe.observe`.
- ``speed``: the quick ResNet-101 speed table on ``cuda:0*8``.
- ``memory``: the quick AmoebaNet-D memory table on ``cuda:0*8``, per device.
- ``distributed``: the distributed engine on CUDA: one NCCL process holding
  both stages of ``pipeline-2`` (interleaved schedule; one GPU cannot host two
  NCCL ranks).
- ``engine``: the engine micro-benchmark on ``cuda:0`` (plain model vs our
  GPipe vs torchgpipe where installed).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    """One step's verdict: ``status`` is ``pass``, ``fail`` or ``skip``; ``figures`` are short lines to show."""

    name: str
    status: str
    seconds: float = 0.0
    figures: List[str] = field(default_factory=list)
    log: str = ""


# -- the steps that run inside a child process ---------------------------------------------------
# Each prints lines "FIGURE: ..." (shown in the summary) and exits 0 on pass, 1 on fail.


def _figure(text: str) -> None:
    print(f"FIGURE: {text}", flush=True)


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


def step_profile() -> int:
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile

    from gpipe_bench import models
    from gpipe_bench.pipe import GPipe, Observer, StepRecord, observing

    class Cells(Observer):
        def __init__(self) -> None:
            self.records: List[StepRecord] = []

        def step(self, record: StepRecord) -> None:
            self.records.append(record)

    micro, chunks = 16, 32
    torch.manual_seed(0)
    model = models.build("resnet101", num_classes=1000)
    gpipe = GPipe(model, [140, 230], devices=["cuda:0", "cuda:0"], chunks=chunks, checkpoint="except_last")
    optimizer = torch.optim.SGD(gpipe.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(micro * chunks, 3, 224, 224, device="cuda:0")
    y = torch.randint(0, 1000, (micro * chunks,), device="cuda:0")

    def step() -> None:
        optimizer.zero_grad()
        torch.autograd.backward(torch.nn.functional.cross_entropy(gpipe(x), y))
        optimizer.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    cells = Cells()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, observing(cells):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    intervals = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    )
    busy, until = 0.0, float("-inf")
    for a, b in intervals:  # union of device activity (microseconds)
        if b > until:
            busy += b - max(a, until)
            until = b
    fraction = busy / 1e6 / wall
    _figure(
        f"ResNet-101 pipeline-2 on cuda:0*2, {chunks} micro-batches of {micro} at 224x224: step {wall * 1e3:.0f} ms, "
        f"GPU busy {fraction:.1%} of it"
    )
    for kind in ("forward", "recompute", "backward"):
        times = [r.host_ns / 1e6 for r in cells.records if r.kind == kind]
        if times:
            _figure(
                f"engine host time per {kind} cell: median {statistics.median(times):.2f} ms, "
                f"max {max(times):.2f} ms over {len(times)} cells"
            )
    return 0


STEPS_IN_CHILD: Dict[str, Callable[[], int]] = {"mixed": step_mixed, "syncs": step_syncs, "profile": step_profile}


# -- the driver ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: int
    command: Callable[[str, Path], List[str]]  # (python, scratch dir) -> argv
    figures: Callable[[str], List[str]]


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
            "-q",
            "-m",
            "cuda",
            "-p",
            "timeout",
            "--timeout",
            "120",
            "-p",
            "no:cacheprovider",
            *_cuda_test_files(),
        ],
        _pytest_summary,
    ),
    Step("mixed", 60, _own("mixed"), _tagged),
    Step("syncs", 60, _own("syncs"), _tagged),
    Step("profile", 120, _own("profile"), _tagged),
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
        lambda out: [line for line in out.splitlines() if line.startswith("(b)/")],
    ),
]


def run_step(step: Step, python: str, scratch: Path, limit_s: float, min_s: float = 10.0) -> Outcome:
    """Run one step in its own process group; past ``limit_s`` the whole group is killed (launchers' ranks too)."""
    if limit_s < min_s:
        return Outcome(step.name, "skip", figures=["not run: the check's time budget is spent"])
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    started = time.perf_counter()
    child = subprocess.Popen(
        step.command(python, scratch),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        return Outcome(
            step.name,
            "fail",
            time.perf_counter() - started,
            step.figures(out) + [f"timed out after {limit_s:.0f} s"],
            out + err,
        )
    seconds = time.perf_counter() - started
    log = out + err
    figures = step.figures(out)
    if child.returncode != 0:
        last = [line for line in log.strip().splitlines() if line.strip()][-1:] or [f"exit code {child.returncode}"]
        figures.append(f"exit {child.returncode}: {last[0][:160]}")
    return Outcome(step.name, "pass" if child.returncode == 0 else "fail", seconds, figures, log)


def environment() -> List[str]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return [
        f"card:   {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
        f"{torch.cuda.device_count()} visible",
        f"torch:  {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",  # type: ignore[no-untyped-call]
        f"python: {sys.executable} {sys.version.split()[0]}",
        f"date:   {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
    ]


def summary(header: Sequence[str], outcomes: Sequence[Outcome]) -> str:
    lines = ["gpu-check", *header, ""]
    for o in outcomes:
        lines.append(f"{o.status.upper():4}  {o.name:<12} {o.seconds:6.1f} s")
        lines += [f"      {f}" for f in o.figures]
    passed = sum(o.status == "pass" for o in outcomes)
    failed = sum(o.status == "fail" for o in outcomes)
    skipped = sum(o.status == "skip" for o in outcomes)
    lines += ["", f"gpu-check: {passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else "")]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default="", help="comma-separated steps to run (default: all): " + ", ".join(s.name for s in STEPS)
    )
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all steps together (default: 450)")
    parser.add_argument(
        "--out",
        default=os.environ.get("GPU_CHECK_OUT", ""),
        help="folder for summary.txt, summary.json and log.txt (default: none; env GPU_CHECK_OUT)",
    )
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        return STEPS_IN_CHILD[args.child]()

    try:
        import torch
    except ImportError:
        print(
            "gpu-check: torch is not importable by this Python; run with PY=/path/to/python that has it",
            file=sys.stderr,
        )
        return 2
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {s.name for s in STEPS})
    if unknown:
        print(
            f"gpu-check: unknown step {', '.join(unknown)}; choose from {', '.join(s.name for s in STEPS)}",
            file=sys.stderr,
        )
        return 2

    header = environment()
    print("\n".join(header), flush=True)
    deadline = time.perf_counter() + args.budget
    outcomes: List[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for step in STEPS:
            if wanted and step.name not in wanted:
                continue
            print(f"gpu-check: {step.name} ...", flush=True)
            outcome = run_step(step, sys.executable, Path(scratch), min(step.cap_s, deadline - time.perf_counter()))
            print(f"gpu-check: {step.name} {outcome.status} ({outcome.seconds:.1f} s)", flush=True)
            outcomes.append(outcome)
    text = summary(header, outcomes)
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.txt").write_text(text + "\n")
        (out / "summary.json").write_text(
            json.dumps(
                {
                    "environment": header,
                    "steps": [{k: v for k, v in asdict(o).items() if k != "log"} for o in outcomes],
                },
                indent=2,
            )
            + "\n"
        )
        (out / "log.txt").write_text("".join(f"===== {o.name} ({o.status})\n{o.log}\n" for o in outcomes))
    return 0 if all(o.status != "fail" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
