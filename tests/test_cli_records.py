"""A record's name is a promise about its settings: a run given other settings never takes its row's name.

`gpipe-bench plan` prints commands that run a row with another balance, chunks or
checkpoint mode; such a run used to overwrite the row's record and stand in the
tables as the row, beside the published figure. Here a row and the same row with
another balance run into one results directory, end to end on a tiny profile.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

from click.testing import CliRunner, Result

from gpipe_bench.cli import main
from helpers import tiny_configs


def _run(args: List[str], configs: str) -> Result:
    result = CliRunner().invoke(main, args, env={"GPIPE_BENCH_CONFIGS": configs})
    assert result.exit_code == 0, result.output
    return result


def _line(text: str, start: str) -> str:
    """The first line of ``text`` for the row ``start`` (the measured grid comes before compare's predicted one)."""
    return next(x for x in text.splitlines() if x.startswith(start + "  "))


def test_a_row_and_the_row_with_another_balance_are_two_records_labelled_apart(tmp_path: Path) -> None:
    configs = tiny_configs(tmp_path / "cfg")  # quick pipeline-2: batch 8, chunks 2, balance 140,230, except_last
    out = tmp_path / "out"
    speed = ["speed", "resnet101", "--profile", "quick", "--devices", "cpu:0,cpu:1", "--epochs", "2"]
    speed += ["--skip-epochs", "1", "--quiet", "--output", str(out)]
    _run([*speed, "--naive", "2"], configs)
    _run([*speed, "--pipeline", "2", "--batch-size", "8", "--chunks", "2"], configs)  # restates the row: its name
    [row_path] = out.rglob("pipeline-2.json")
    row_bytes = row_path.read_bytes()

    _run([*speed, "--pipeline", "2", "--batch-size", "8", "--chunks", "2", "--balance", "200,170"], configs)

    assert row_path.read_bytes() == row_bytes  # the row's record untouched
    names = sorted(p.name for p in out.rglob("*.json"))
    assert names == ["naive-2.json", "pipeline-2--balance200-170.json", "pipeline-2.json"]
    own = json.loads(next(out.rglob("pipeline-2--balance200-170.json")).read_text())
    assert own["experiment"] == "pipeline-2" and own["settings"]["balance"] == [200, 170]
    assert own["settings"]["overrides"] == {"balance": [200, 170]}
    assert "overrides" not in json.loads(row_bytes)["settings"]

    table = _run(["table", "resnet101-speed", "--results", str(out)], configs).output
    assert "137.788" in _line(table, "pipeline-2")  # the row beside its published figure
    apart = _line(table, "pipeline-2 [balance 200,170]")
    assert "samples/sec" in apart and "137.788" not in apart and "1.489x" not in apart
    [summary] = [x for x in table.splitlines() if x.startswith("Pipelining over the same devices")]
    assert "pipeline-2 / naive-2 on the same 2 devices (gpipe-bench)" in summary
    assert "pipeline-2 [balance 200,170] / naive-2 on the same 2 devices (gpipe-bench)" in summary

    compare = _run(["compare", "resnet101-speed", "--results", str(out)], configs).output
    assert "1.489x" in _line(compare, "pipeline-2")
    assert "1.489x" not in _line(compare, "pipeline-2 [balance 200,170]")
    assert "- not compared: runs with settings of their own (not their rows'): pipeline-2 [balance 200,170]" in compare
