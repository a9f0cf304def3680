"""Pieces several test modules share: a stash/pop pair, the micro-batch reference run, a launch command line, two machines."""

from __future__ import annotations

import ast
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

from gpipe_bench.pipe.skip import pop, skippable, stash


@skippable(stash=["skip"])
class Stash(nn.Module):
    def forward(self, x: Tensor) -> Any:
        yield stash("skip", x)
        return x


@skippable(pop=["skip"])
class Pop(nn.Module):
    def forward(self, x: Tensor) -> Any:
        skip = yield pop("skip")
        return x + skip


def run_micro_batches(model: nn.Module, x: Tensor, weight: Tensor, chunks: int) -> Tensor:
    """GPipe's definition: the plain model on each micro-batch, gradients of ``(out * weight).sum()`` accumulated."""
    outs = []
    for piece, w in zip(x.chunk(chunks), weight.chunk(chunks)):
        out = model(piece)
        (out * w).sum().backward()
        outs.append(out.detach())
    return torch.cat(outs)


def launch_command(*args: str, nproc: int = 2) -> List[str]:
    """``gpipe-bench launch --nproc N -- ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "gpipe_bench.cli", "launch", "--nproc", str(nproc), "--", *args]


# Two machines as records describe them: the published tables' 8-GPU host, and a 2-core CPU.
P40: Dict[str, Any] = {
    "devices": ["cuda:0"],
    "device_names": {"cuda:0": "Tesla P40"},
    "gpus": ["Tesla P40"] * 8,
    "hip": None,
    "usable_cores": 48,
    "cpu_model": "Intel(R) Xeon(R) CPU E5-2650 v4 @ 2.20GHz",
    "torch": "1.3.0",
}
EPYC: Dict[str, Any] = {
    "devices": ["cpu:0", "cpu:1"],
    "device_names": {},
    "gpus": [],
    "hip": None,
    "usable_cores": 2,
    "cpu_count": 2,
    "cpu_model": "AMD EPYC 7B13",
    "torch": "2.14.1",
}
SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def tiny_configs(directory: Any) -> str:
    """A copy of the shipped configs whose ResNet-101 speed quick profile is tiny (16 samples at 32x32 an epoch, batches of 8,
    two micro-batches for the rows that have several).

    ``--batch-size 8 --chunks 2`` restate these rows' settings: a run with them keeps its row's name.

    Point GPIPE_BENCH_CONFIGS at it to run the command line end to end in seconds.
    """
    import shutil
    from pathlib import Path

    import yaml

    from gpipe_bench import config

    folder = Path(directory) / "configs"
    shutil.copytree(config.config_dir(), folder)
    path = folder / "resnet101-speed.yaml"
    data = yaml.safe_load(path.read_text())
    quick = data["profiles"]["quick"]
    quick["settings"].update(input_size=32, dataset_size=16)
    for row in data["rows"]:
        sizes = quick.setdefault("rows", {}).setdefault(row["name"], {})
        sizes["batch"] = 8
        if row.get("chunks", 1) > 1:
            sizes["chunks"] = 2
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(folder)


def one_line_error(result: Any, *needles: str) -> None:
    """A click result that is a user error: exit 2, one `Error` line naming every needle, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def accuracy_record(name: str, samples: List[float], mode: str, curves: Optional[Dict[str, List[float]]] = None) -> Any:
    """A quick-profile record of the ResNet-101 accuracy table: ``samples`` (one final error per seed) on a test
    CPU, with per-epoch ``curves`` by seed when given."""
    from gpipe_bench import config
    from gpipe_bench.results import Result

    table = config.load("resnet101-accuracy")
    env = {"cpu_model": "Test CPU", "usable_cores": 2, "cpu_count": 2, "gpus": [], "torch": "2.14.1"}
    return Result(
        table=table.name,
        experiment=name,
        profile="quick",
        engine="gpipe-bench",
        kind="accuracy",
        metric=table.metric,
        unit=table.unit,
        value=sum(samples) / len(samples),
        status="ok",
        samples=samples,
        settings={"mode": mode},
        environment=env,
        extra={"curves": curves} if curves is not None else {},
    )


# A command that starts a "rank": a process in a session of its own (as torchrun starts its
# ranks) that sleeps and holds the command's output, which a signal to the command's process
# group does not reach. It writes the rank's pid, prints a figure line, then hangs or exits.
# argv: pid file, "hang" or "exit", "1" to ignore SIGTERM, and the exit code (default 0).
RANK_SCRIPT = """
import os, signal, subprocess, sys, time
pid_file, mode, deaf = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
code = int(sys.argv[4]) if len(sys.argv) > 4 else 0
if deaf:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
with open(pid_file + ".part", "w") as f:
    f.write(str(rank.pid))
os.replace(pid_file + ".part", pid_file)
print("FIGURE: started", flush=True)
if mode == "hang":
    time.sleep(300)
sys.exit(code)
"""


def rank_command(
    pid_file: Path, mode: str, deaf: bool = False, code: int = 0, python: str = sys.executable
) -> List[str]:
    """``RANK_SCRIPT`` as a command line."""
    return [python, "-c", RANK_SCRIPT, str(pid_file), mode, "1" if deaf else "0", str(code)]


def process_gone(pid: int) -> bool:
    """No such process, or a zombie (dead; its parent, maybe init, has not collected it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def wait_for_file(path: Path, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def kill_recorded(pid_file: Path) -> None:
    """Kill the process whose pid ``pid_file`` holds, if it was written and the process is alive."""
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def module_imports(source: str, package: List[str], with_names: bool = False) -> Iterator[Any]:
    """(line, absolute module name) of every import in ``source``, a module of ``package``, at any depth.

    Imports inside functions count: a lazy import that reaches across the layers
    ties them together as surely as one at the top. ``with_names``: (line, module,
    the names ``from module import ...`` takes), so a caller can tell a submodule from a name.
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield (node.lineno, alias.name, []) if with_names else (node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [alias.name for alias in node.names]
            yield (node.lineno, module, names) if with_names else (node.lineno, module)


class ThreadCount(nn.Module):
    """A layer that records the intra-op thread count it runs with, and passes its input on."""

    def __init__(self, seen: List[int]) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(torch.get_num_threads())
        return x
