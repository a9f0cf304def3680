"""The command line's timelines: ``speed --timeline`` writes both files for a tiny row.

A path it cannot write, or a row it cannot record, is one line and exit 2
before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest
from click.testing import CliRunner, Result

from gpipe_bench.cli import main
from helpers import one_line_error, tiny_configs


def _speed(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(
        main,
        ["speed", "resnet101", "--profile", "quick", "--epochs", "2", "--skip-epochs", "1", "--batch-size", "8"]
        + ["--quiet", "--output", str(tmp_path / "out"), *args],
        env={"GPIPE_BENCH_CONFIGS": tiny_configs(tmp_path / "cfg")},
    )


@pytest.mark.slow
def test_speed_writes_the_timeline_of_a_pipeline_row(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = _speed(
        tmp_path,
        "--pipeline",
        "2",
        "--chunks",
        "2",
        "--devices",
        "cpu:0,cpu:1",
        "--timeline",
        str(tmp_path / "tl" / "t"),
    )
    assert result.exit_code == 0, result.output
    png, trace = tmp_path / "tl" / "t.png", tmp_path / "tl" / "t.json"
    assert png.read_bytes().startswith(b"\x89PNG") and f"{png}, {trace}" in result.output
    events = json.loads(trace.read_text())["traceEvents"]
    lanes = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(lanes.values()) == ["cpu:0", "cpu:1", "host"]
    cells = {(lanes[e["tid"]], e["name"]) for e in events if e["ph"] == "X"}
    assert {(d, f"{p}{i}") for d in ("cpu:0", "cpu:1") for p in "FB" for i in range(2)} <= cells
    assert ("cpu:0", "R0") in cells and ("host", "optimizer") in cells  # except_last: micro-batch 0 recomputed
    assert [p.name for p in (tmp_path / "out").rglob("*.json")] == ["pipeline-2.json"]  # the record, unchanged


def test_speed_records_the_plain_model_of_naive_1(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = _speed(tmp_path, "--naive", "1", "--devices", "cpu", "--timeline", str(tmp_path / "n1.png"))
    assert result.exit_code == 0, result.output
    events = json.loads((tmp_path / "n1.json").read_text())["traceEvents"]
    assert sorted(e["name"] for e in events if e["ph"] == "X") == ["B0", "F0", "loss", "optimizer", "zero_grad"]
    assert (tmp_path / "n1.png").exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (
            ["--pipeline", "2", "--devices", "cpu:0,cpu:1", "--timeline", "{blocker}/t"],
            ["--timeline", "cannot write the timeline", "file"],
        ),
        (
            ["--pipeline", "2", "--engine", "torchgpipe", "--timeline", "{dir}/t"],
            ["--timeline", "pipeline-2", "torchgpipe", "gpipe-bench"],
        ),
        (
            ["--pipeline", "2", "--engine", "distributed", "--timeline", "{dir}/t"],
            ["--timeline", "distributed", "gpipe-bench"],
        ),
    ],
)
def test_speed_refuses_a_timeline_it_cannot_write_before_anything_runs(
    tmp_path: Path, args: List[str], needles: List[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _speed(tmp_path, *(a.format(blocker=blocker, dir=tmp_path / "tl") for a in args))
    one_line_error(result, *needles)
    assert not (tmp_path / "out").exists() and not (tmp_path / "tl").exists()
