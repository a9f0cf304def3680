"""``--engine distributed`` as a user runs it: under gpipe-bench launch, and the errors outside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpipe_bench.cli import main
from helpers import launch_command

# Each test launches processes (torchrun and its ranks): seconds each; `pytest -m "not slow"` leaves them out.
pytestmark = pytest.mark.slow


def test_outside_torchrun_says_how_to_launch(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["speed", "resnet101", "--pipeline", "2", "--engine", "distributed", "--output", str(tmp_path)],
        env={"RANK": None, "WORLD_SIZE": None},
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "gpipe-bench launch --nproc N" in result.output and "torchrun" in result.output
    assert not list(tmp_path.rglob("*.json"))


def test_a_row_on_two_processes_writes_one_record(tmp_path: Path) -> None:
    cmd = launch_command(
        "speed",
        "resnet101",
        "--pipeline",
        "2",
        "--engine",
        "distributed",
        "--schedule",
        "1f1b",
        "--profile",
        "quick",
        "--epochs",
        "1",
        "--skip-epochs",
        "0",
        "--output",
        str(tmp_path),
        "--quiet",
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = list(tmp_path.rglob("*.json"))
    assert [r.name for r in records] == ["pipeline-2--distributed-1f1b.json"]
    record = json.loads(records[0].read_text())
    assert record["status"] == "ok" and record["value"] > 0 and record["settings"]["processes"] == 2


def test_a_row_of_another_stage_count_is_refused(tmp_path: Path) -> None:
    cmd = launch_command(
        "speed",
        "resnet101",
        "--pipeline",
        "4",
        "--engine",
        "distributed",
        "--profile",
        "quick",
        "--output",
        str(tmp_path),
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "pipeline-4: 4 stage(s) but 2 process(es) were launched; launch with --nproc 4" in done.stderr
    assert not list(tmp_path.rglob("*.json"))


def test_one_f_one_b_holds_less_activation_memory_than_gpipe(tmp_path: Path) -> None:
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        cmd = launch_command(
            "memory",
            "amoebanetd",
            "--pipeline",
            "2",
            "--engine",
            "distributed",
            "--schedule",
            schedule,
            "--profile",
            "quick",
            "--output",
            str(tmp_path),
        )
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        record = json.loads(next(tmp_path.rglob(f"pipeline-2--distributed-{schedule}.json")).read_text())
        peaks[schedule] = record["extra"]["measured_per_device_gib"]
    assert max(peaks["1f1b"]) < max(peaks["gpipe"]) and sum(peaks["1f1b"]) < sum(peaks["gpipe"])


def test_interleaved_needs_two_stages_per_process(tmp_path: Path) -> None:
    cmd = launch_command(
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
        "--output",
        str(tmp_path),
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "Error: pipeline-2: interleaved needs at least two stages per process and the same number on each "
        "(2 stage(s) on 2 process(es)); launch with --nproc 1"
    ]
    assert not list(tmp_path.rglob("*.json"))


def test_two_hosts_meet_at_a_rendezvous_and_write_one_record(tmp_path: Path) -> None:
    """Two launches with --nnodes 2 (two "hosts" on this one), one process each, c10d rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "gpipe_bench.cli",
        "launch",
        "--nnodes",
        "2",
        "--nproc",
        "1",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "test-two-hosts",
        "--",
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
        str(tmp_path),
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    hosts = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    try:
        outputs = [host.communicate(timeout=300) for host in hosts]
    finally:
        for host in hosts:
            if host.poll() is None:
                host.kill()
    assert [host.returncode for host in hosts] == [0, 0], [err[-2000:] for _, err in outputs]
    records = list(tmp_path.rglob("*.json"))
    assert [r.name for r in records] == ["pipeline-2--distributed-gpipe.json"]
    assert json.loads(records[0].read_text())["settings"]["processes"] == 2
