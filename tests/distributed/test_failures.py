"""A rank that raises or dies under ``gpipe-bench launch``: every rank stops in bounded time, the error shows once.

The fault is injected from outside the package: a ``sitecustomize`` on
PYTHONPATH replaces the pipeline step of one rank, from its second step on
(after torch's shape inference), while its peers wait in a send or receive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Dict, List

import pytest

from gpipe_bench.distributed.launch import Failure, first_failure
from helpers import launch_command

# Each test launches processes (torchrun and its ranks): seconds each; `pytest -m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

_INJECT = textwrap.dedent("""
    import os
    if os.environ.get("RANK") == os.environ.get("FAULT_RANK"):
        import signal
        from gpipe_bench.distributed import schedule

        _step, _calls = schedule.step, [0]

        def step(*args, **kwargs):
            _calls[0] += 1
            if _calls[0] == 2:
                if os.environ["FAULT"] == "raise":
                    raise RuntimeError("injected fault on rank " + os.environ["RANK"])
                if os.environ["FAULT"] == "hang":
                    import pathlib, time
                    if os.environ.get("FAULT_MARK"):
                        pathlib.Path(os.environ["FAULT_MARK"]).touch()
                    time.sleep(3600)
                os.kill(os.getpid(), signal.SIGKILL)
            return _step(*args, **kwargs)

        schedule.step = step
""")


def _processes_naming(marker: str) -> List[int]:
    """Live processes (not zombies) whose command line contains ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(pid))
    return found


def _fault_env(tmp_path: Path, fault: str, rank: int) -> Dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_INJECT)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "FAULT": fault,
        "FAULT_RANK": str(rank),
        "FAULT_MARK": str(tmp_path / "hanging"),
    }


def _launch_with_fault(tmp_path: Path, fault: str, rank: int, *options: str) -> subprocess.CompletedProcess:
    env = _fault_env(tmp_path, fault, rank)
    out = tmp_path / "results"
    cmd = launch_command(
        "speed",
        "resnet101",
        "--pipeline",
        "2",
        "--engine",
        "distributed",
        "--profile",
        "quick",
        "--epochs",
        "1",
        "--skip-epochs",
        "0",
        "--output",
        str(out),
        "--quiet",
        *options,
    )
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert time.monotonic() - start < 180, "the launch took too long to stop"
    assert not list(out.rglob("*.json")), "a failed row left a result file"
    assert not _processes_naming(str(out)), "a rank outlived the launch"
    return done


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_raises_stops_all_and_shows_its_error_once(tmp_path: Path, rank: int) -> None:
    done = _launch_with_fault(tmp_path, "raise", rank)
    assert done.returncode == 1
    assert (
        done.stderr.count(f"RuntimeError: injected fault on rank {rank}") == 2
    )  # the traceback's last line and the summary
    assert done.stderr.count("Traceback") == 1
    assert f"rank {rank} of 2 failed first" in done.stderr


def test_a_rank_that_dies_is_named_with_its_signal(tmp_path: Path) -> None:
    done = _launch_with_fault(tmp_path, "kill", 1)
    assert done.returncode == 1
    assert "rank 1 of 2 died first: killed by SIGKILL" in done.stderr
    assert "Traceback" not in done.stderr  # its peer's lost connection is a consequence, not shown


def test_a_rank_that_hangs_fails_its_peer_after_the_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    done = _launch_with_fault(tmp_path, "hang", 1, "--timeout", "4")
    assert done.returncode == 1 and time.monotonic() - start < 120
    assert "rank 0 of 2 failed first" in done.stderr and "Timed out waiting 4000ms" in done.stderr
    assert "process group's timeout (--timeout)" in done.stderr


def test_ctrl_c_stops_every_rank_and_says_so_once(tmp_path: Path) -> None:
    env, out = _fault_env(tmp_path, "hang", 1), tmp_path / "results"
    cmd = launch_command(
        "speed",
        "resnet101",
        "--pipeline",
        "2",
        "--engine",
        "distributed",
        "--profile",
        "quick",
        "--output",
        str(out),
        "--quiet",
    )
    launch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "hanging").exists():  # the row is under way
            assert time.monotonic() < deadline and launch.poll() is None, "the row did not start"
            time.sleep(0.2)
        launch.send_signal(signal.SIGINT)
        _, stderr = launch.communicate(timeout=60)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 130
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "gpipe-bench launch: interrupted; the ranks were stopped and nothing was written for the row in progress."
    ]
    assert not list(out.rglob("*.json")) and not _processes_naming(str(out))


def test_a_usage_error_is_one_line_once(tmp_path: Path) -> None:
    cmd = launch_command(
        "speed",
        "resnet101",
        "--pipeline",
        "2",
        "--engine",
        "distributed",
        "--profile",
        "quick",
        "--chunks",
        "5",
        "--output",
        str(tmp_path),
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "batch 64 is not divisible by chunks 5" in lines[0], done.stderr
    assert not list(tmp_path.rglob("*.json"))


def _write(folder: Path, failure: Failure) -> None:
    import json

    (folder / f"rank{failure.rank}.json").write_text(json.dumps(failure.__dict__))


def test_first_failure_prefers_a_rank_that_died_then_the_earliest_error(tmp_path: Path) -> None:
    _write(tmp_path, Failure(0, "error", "RuntimeError: connection closed", "tb0", time=2.0))
    _write(tmp_path, Failure(2, "error", "ValueError: bad", "tb2", time=1.0))
    codes: Dict[int, int] = {0: 1, 1: -9, 2: 1}
    died = first_failure(str(tmp_path), codes)
    assert died is not None and died.rank == 1 and died.kind == "died" and "SIGKILL" in died.text
    earliest = first_failure(str(tmp_path), {0: 1, 2: 1})
    assert earliest is not None and earliest.rank == 2 and earliest.detail == "tb2"
    assert "rank 2 of 4 failed first: ValueError: bad" in earliest.report(4)
    assert first_failure(str(tmp_path / "missing"), {}) is None
