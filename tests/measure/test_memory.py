"""The memory benchmark as a user runs it: the published columns, measured vs predicted, OOM rows, bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import List

import pytest
import torch
from click.testing import CliRunner

from gpipe_bench import config, models, report
from gpipe_bench.cli import main
from gpipe_bench.engines.local import LocalTrainer
from gpipe_bench.jobs import Job
from gpipe_bench.measure import memory

TABLE = config.load("amoebanetd-memory")
QUICK = TABLE.profile("quick")
PUBLISHED_COUNTS = {
    "naive-1": 89_745_302,
    "pipeline-1": 358_456_186,
    "pipeline-2": 612_770_042,
    "pipeline-4": 1_163_292_602,
    "pipeline-8": 2_005_905_418,
}


def _job(name: str, profile: str = "quick", **row_changes: object) -> Job:
    prof = TABLE.profile(profile)
    row = replace(TABLE.row(name, profile), **row_changes)
    devices = [f"cpu:{k}" for k in range(row.devices)] if row.mode == "pipeline" else ["cpu:0"]
    return Job(TABLE, row, prof.settings, profile, devices)


@pytest.mark.slow
def test_every_quick_row_is_predicted_within_ten_percent_of_the_measurement() -> None:
    """The acceptance figure: predicted vs measured peak activation memory on the quick profile, on CPU."""
    for row in QUICK.rows:
        result = memory.run(_job(row.name))
        assert result is not None and result.status == "ok"
        measured, predicted = result.value, result.extra["predicted_gib"]
        assert measured > 0
        assert predicted == pytest.approx(measured, rel=0.10), row.name
        assert len(result.extra["measured_per_device_gib"]) == row.devices


@pytest.mark.parametrize("name", list(PUBLISHED_COUNTS))
def test_published_parameters_and_model_memory_follow_the_column_rule(name: str) -> None:
    row = TABLE.row(name)
    layers, params = models.count(TABLE.model, **row.model_args, num_classes=10)
    assert params == PUBLISHED_COUNTS[name]
    memory_gib = params * 4 * 3 / 2**30
    published = row.published.values["model_memory_gb"]
    if name == "pipeline-2":  # the slip in the source: the rule gives 6.85
        assert round(memory_gib, 2) == 6.85 and published == 6.45
    else:
        assert round(memory_gib, 2) == published


def test_a_published_row_is_sized_without_running_it() -> None:
    result = memory.run(_job("pipeline-1", "published"), predict_only=True)
    assert result is not None and result.status == "predicted" and result.value is None
    assert result.extra["parameters"] == PUBLISHED_COUNTS["pipeline-1"]
    assert round(result.extra["model_memory_gib"], 2) == 4.01
    assert 1.0 < result.extra["predicted_gib"] < 24.0


@pytest.mark.parametrize("name", [r.name for r in QUICK.rows if r.mode == "pipeline" and r.devices > 1])
def test_recorded_quick_balances_are_what_balance_by_size_finds(name: str) -> None:
    recorded = TABLE.row(name, "quick").balance
    assert memory.find_balance(_job(name, balance=None)) == recorded


def test_the_prediction_is_compared_with_allocated_memory_on_cuda_and_the_meter_on_cpu() -> None:
    mib = 2**20
    # CUDA: reserved is the published column's figure; the prediction is held against what tensors took.
    assert memory.compared(30 * mib, [40 * mib, 44 * mib], [25 * mib, 35 * mib]) == pytest.approx(0.5)
    assert memory.compared(30 * mib, [40 * mib, 20 * mib], []) == pytest.approx(0.5)  # CPU: the meter's one figure
    assert memory.compared(30 * mib, [0], []) is None


def test_a_cuda_row_records_reserved_and_allocated_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real loop on host tensors, with the allocator's counters of a pretended GPU."""
    reserved, allocated = 2 * 2**30, 3 * 2**29
    calls: List[str] = []
    monkeypatch.setattr(LocalTrainer, "memory_devices", lambda self: ["cuda:0"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated)
    result = memory.run(_job("naive-1"))
    assert result is not None and result.status == "ok" and "reset" in calls
    extra = result.extra
    model = extra["model_memory_per_device_gib"][0]
    assert extra["method"] == memory.METHODS["cuda"]
    assert result.value == pytest.approx(reserved / memory.GIB - model)  # the table's column: reserved
    assert extra["measured_per_device_gib"] == [pytest.approx(reserved / memory.GIB - model)]
    assert extra["allocated_per_device_gib"] == [pytest.approx(allocated / memory.GIB - model)]
    assert extra["allocated_gib"] == pytest.approx(allocated / memory.GIB - model)
    assert extra["predicted_over_measured"] == pytest.approx(extra["predicted_gib"] / extra["allocated_gib"])
    assert extra["predicted_compared_with"] == memory.COMPARED_WITH["cuda"]
    json.dumps(result.to_json())


def test_a_cpu_row_compares_the_prediction_with_the_meter() -> None:
    result = memory.run(_job("naive-1"))
    assert result is not None and result.status == "ok" and result.value is not None
    extra = result.extra
    assert "allocated_gib" not in extra and "allocated_per_device_gib" not in extra
    assert extra["predicted_over_measured"] == pytest.approx(extra["predicted_gib"] / result.value)
    assert extra["predicted_compared_with"] == memory.COMPARED_WITH["cpu"] == memory.METHODS["cpu"]


def test_out_of_memory_is_a_row_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*_: object) -> memory.Peaks:
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(memory, "measure", oom)
    result = memory.run(_job("naive-1"))
    assert result is not None and result.status == "oom" and result.value is None and result.extra["predicted_gib"] > 0
    text = report.render(TABLE, [result])
    assert "Out of memory" in text


def test_a_row_that_cannot_fit_the_host_is_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 1024)
    monkeypatch.setattr(memory, "measure", lambda *_: pytest.fail("must not run"))
    result = memory.run(_job("pipeline-2"))
    assert result is not None and result.status == "oom" and "predicted to need" in result.extra["note"]


def test_cli_row_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "memory",
            "amoebanetd",
            "--experiment",
            "pipeline-2",
            "--profile",
            "quick",
            "--per-device",
            "--output",
            str(tmp_path),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    files = list(tmp_path.rglob("pipeline-2.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["status"] == "ok" and record["settings"]["balance"] == [107, 38]
    assert "Total Peak Activation Memory" in result.output and "Predicted" in result.output
    assert "cpu:1" in result.output  # the per-device table


def test_predict_only_prints_the_prediction_and_saves_nothing(tmp_path: Path) -> None:
    """Rows sized for cuda:0... were saved under this host's key, as if measured here, and a PNG beside them."""
    args = ["memory", "amoebanetd", "--profile", "published", "--pipeline", "2", "--predict-only", "--per-device"]
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()  # no record, no plot
    assert "6.37 GiB predicted reserved (5.38 GiB allocated) (not saved: a prediction, not a measurement)" in (
        result.output
    )
    pipeline_2 = next(line for line in result.output.splitlines() if line.startswith("pipeline-2 "))
    assert "not measured" in pipeline_2 and "6.37 GiB" in pipeline_2  # Predicted: what the allocator reserves
    assert "cuda:1" in result.output  # the per-device table of the devices it was sized for


@pytest.mark.parametrize(
    "args, needles",
    [
        (["memory", "resnet101"], ["resnet101", "amoebanetd"]),
        (["memory", "amoebanetd", "--pipeline", "3"], ["pipeline"]),
        (["memory", "amoebanetd", "--pipeline", "2", "--balance", "1,2", "--profile", "quick"], ["balance", "145"]),
        (["memory", "amoebanetd", "--pipeline", "2", "--devices", "cpu:0", "--profile", "quick"], ["--devices"]),
        (["memory", "amoebanetd", "--pipeline", "2", "--predict-only", "--devices", "cpu:0"], ["--devices"]),
        (["table", "resnet101-speed", "--per-device"], ["--per-device"]),
    ],
)
def test_memory_bad_input(args: List[str], needles: List[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, args + (["--output", str(tmp_path)] if args[0] == "memory" else []))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0]
    assert not list(tmp_path.rglob("*.json"))


def test_predict_only_follows_the_allocator_era_and_refuses_a_bad_alloc_conf(tmp_path: Path) -> None:
    args = ["memory", "amoebanetd", "--profile", "published", "--pipeline", "1", "--predict-only"]
    then = CliRunner().invoke(main, [*args, "--allocator-era", "1.3"])
    assert then.exit_code == 0, then.output
    assert "2.09 GiB predicted reserved (1.88 GiB allocated)" in then.output
    assert "PyTorch 1.3 (2019)" in then.output
    bad = CliRunner().invoke(main, args, env={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:5"})
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1] == (
        "Error: PYTORCH_CUDA_ALLOC_CONF max_split_size_mb:5: too small, must be >= 20 (MiB); fix or unset the variable"
    )
    assert "Traceback" not in bad.output
