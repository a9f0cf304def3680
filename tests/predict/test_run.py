"""A table's rows predicted: the published ResNet-101 speedups on the P40 preset stay within the table's tolerance.

This is the regression check against the published numbers that needs no GPU:
a change to the engine's schedule or to the cost model that moves a predicted
speedup out of the tolerance fails here (and in `gpipe-bench compare --check`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpipe_bench import config
from gpipe_bench.cli import main
from gpipe_bench.config import Overrides
from gpipe_bench.predict.run import predict_table, predicted_speedups
from gpipe_bench.predict.sources import parse_calibration


def test_published_resnet_speedups_are_predicted_within_tolerance() -> None:
    table = config.load("resnet101-speed")
    assert table.predicted["check"] is True
    predicted = predicted_speedups(table)
    for row in table.profile("published").rows:
        published = row.published.values.get("speedup")
        if published is None:
            continue
        ratio = predicted.speedups[row.name] / float(published)
        assert abs(ratio - 1) <= table.tolerance, (row.name, predicted.speedups[row.name], published)


def test_compare_check_runs_the_predictions(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["compare", "resnet101-speed", "--check", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Predicted on p40" in result.output and "checked by compare --check" in result.output


def test_a_prediction_out_of_tolerance_is_a_regression(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = config.load

    def strict(name: str) -> config.Table:
        table = real(name)
        return replace(table, tolerance=0.001) if name == "resnet101-speed" else table

    monkeypatch.setattr(config, "load", strict)
    result = CliRunner().invoke(main, ["compare", "resnet101-speed", "--check", "--results", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "[predicted]" in result.output


def test_calibration_fits_one_efficiency_and_says_so() -> None:
    table = config.load("resnet101-speed")
    rows = [table.row("naive-1"), table.row("pipeline-2")]
    out = predict_table(
        table, "published", rows, Overrides(), None, hardware="p40", calibration=("naive-1", 92.539), memory=False
    )
    assert out.fitted is not None and out.fitted[0] == "naive-1"
    assert 0.1 < out.fitted[2] < 1.0
    assert out.rows[0].throughput == pytest.approx(92.539, rel=1e-3)
    assert "fitted on naive-1=92.539" in out.costs


def test_parse_calibration() -> None:
    assert parse_calibration("naive-1=92.539") == ("naive-1", 92.539)
    assert parse_calibration(None) is None


def test_torchgpipe_is_predicted_as_its_own_engine() -> None:
    """The peer's rows carry its name; on CPUs its autograd backward takes turns, so it is never faster than ours."""
    table = config.load("resnet101-speed")
    rows = [table.row("pipeline-2", "quick")]
    ours = predict_table(table, "quick", rows, Overrides(), None, hardware="epyc-2vcpu", memory=False)
    peer = predict_table(
        table, "quick", rows, Overrides(), None, hardware="epyc-2vcpu", memory=False, engine="torchgpipe"
    )
    assert [p.job.record_engine for p in peer.rows] == ["torchgpipe"]
    assert peer.rows[0].throughput < ours.rows[0].throughput
    result = CliRunner().invoke(
        main, ["predict", "resnet101", "--hardware", "p40", "--engine", "torchgpipe", "--pipeline", "2"]
    )
    assert result.exit_code == 0, result.output
