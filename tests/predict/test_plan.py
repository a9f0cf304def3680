"""`gpipe-bench plan` as a user runs it: plans on presets, the memory cap, planned rows, and bad input.

Presets keep these fast (the model is counted on ``meta``; nothing is timed)
except where a planned row is timed end to end on the tiny configs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
from click.testing import CliRunner, Result

from gpipe_bench import config, jobs
from gpipe_bench.cli import main
from gpipe_bench.config import Overrides
from gpipe_bench.pipe.balance.partition import block_cost, solve_blocks
from gpipe_bench.predict import hardware as presets
from gpipe_bench.predict.costs import HardwareCosts
from gpipe_bench.predict.plan import (
    OVER,
    Choice,
    _layer_weights,
    _Search,
    _template,
    chunk_choices,
    parse_size,
    planned_balance,
    resolve_planned,
)
from gpipe_bench.predict.rows import model_key
from gpipe_bench.predict.simulate import LayerCost, rank_threads, worker_threads
from helpers import one_line_error, tiny_configs

GIB = 1 << 30


def _run(args: List[str], **env: str) -> Result:
    return CliRunner().invoke(main, args, env=env or None)


def _plan(*extra: str) -> List[Dict[str, Any]]:
    args = ["plan", "resnet101", "--devices", "0,1", "--hardware", "p40", "--batch", "256", "--format", "json"]
    result = _run([*args, "--quiet", *extra])
    assert result.exit_code == 0, result.output
    records: List[Dict[str, Any]] = json.loads(result.output)
    return records


@pytest.fixture(scope="module")
def uncapped() -> List[Dict[str, Any]]:
    """The plans without a cap (the preset's 24 GiB): shared by the tests that only read them."""
    return _plan()


def test_plans_are_valid_fastest_first_and_beat_the_published_configuration(uncapped: List[Dict[str, Any]]) -> None:
    records = uncapped
    plans, published = records[:-1], records[-1]
    assert len(plans) == 3 and published["published"] and not any(p["published"] for p in plans)
    for p in records:
        assert sum(p["balance"]) == 370 and len(p["balance"]) == 2
        assert p["checkpoint"] in ("never", "except_last", "always") and p["chunks"] >= 1
        assert p["throughput"] > 0 and p["speedup"] > 0
        assert p["command"].startswith("gpipe-bench speed resnet101 --profile published --pipeline 2")
        assert f"--balance {p['balance'][0]},{p['balance'][1]}" in p["command"]
        assert f"--chunks {p['chunks']}" in p["command"] and "--batch-size 256" in p["command"]
    throughputs = [p["throughput"] for p in plans]
    assert throughputs == sorted(throughputs, reverse=True)
    assert plans[0]["throughput"] >= published["throughput"]
    # the published micro-batch (4096 / 256 = 16) is kept at the smaller batch
    assert published["balance"] == [140, 230] and published["chunks"] == 16


def test_every_plan_fits_the_cap_the_published_configuration_exceeds(uncapped: List[Dict[str, Any]]) -> None:
    published_peak = uncapped[-1]["peak_memory_bytes"]
    cap = int(0.6 * published_peak)
    records = _plan("--memory-per-device", str(cap))
    plans, published = records[:-1], records[-1]
    assert plans and published["peak_memory_bytes"] > cap
    for p in plans:
        assert p["peak_memory_bytes"] <= cap
        assert max(p["memory_bytes_per_device"]) == p["peak_memory_bytes"]


def test_a_cap_below_every_plan_says_the_smallest_that_works_and_that_one_works() -> None:
    args = ["plan", "resnet101", "--devices", "0,1", "--hardware", "p40", "--batch", "256", "--quiet"]
    result = _run([*args, "--memory-per-device", "100MiB"])
    one_line_error(result, "--memory-per-device", "no plan fits 0.10GiB", "the smallest that works is")
    smallest = result.output.split("give --memory-per-device ")[1].split()[0]
    again = _run([*args, "--memory-per-device", smallest, "--format", "json"])
    assert again.exit_code == 0, again.output
    plans = [p for p in json.loads(again.output) if not p["published"]]
    assert plans and all(p["peak_memory_bytes"] <= parse_size(smallest) for p in plans)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--devices", "cpu:0*371", "--hardware", "epyc-2vcpu"], ["--devices", "371 devices", "370 layers"]),
        (["--devices", "cpu:0,cpu:1", "--batch", "1", "--hardware", "epyc-2vcpu"], ["--batch", "batch 1", "2 devices"]),
        (["--devices", "0,1", "--hardware", "p40", "--memory-per-device", "lots"], ["--memory-per-device", "'lots'"]),
        (["--devices", "0,1", "--hardware", "p40", "--costs", "measured"], ["two cost sources"]),
        (["--devices", "0,1", "--calibrate", "naive-1=92.5"], ["--calibrate", "--hardware"]),
        (["--devices", "0,1", "--hardware", "p41"], ["p41"]),
        (["--devices", "zero", "--hardware", "p40"], ["--devices", "'zero'"]),
    ],
)
def test_bad_input_is_one_line(args: List[str], needles: List[str]) -> None:
    one_line_error(_run(["plan", "resnet101", "--quiet", *args]), *needles)


def test_an_unknown_model_is_one_line() -> None:
    one_line_error(_run(["plan", "resnet102", "--devices", "0,1", "--hardware", "p40"]), "resnet102")


def test_distributed_plans_name_schedules_and_launch_commands() -> None:
    args = ["plan", "resnet101", "--devices", "cpu:0,cpu:1", "--hardware", "epyc-2vcpu", "--profile", "quick"]
    result = _run([*args, "--engine", "distributed", "--batch", "64", "--top", "5", "--format", "json", "--quiet"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    plans = [p for p in records if not p["published"]]
    assert {p["schedule"] for p in plans} <= {"gpipe", "1f1b", "interleaved"}
    for p in plans:
        assert p["command"].startswith("gpipe-bench launch --nproc 2 -- speed resnet101")
        assert f"--schedule {p['schedule']}" in p["command"]
        assert 64 % p["chunks"] == 0 and p["processes"] == 2
        assert len(p["balance"]) == (2 if p["schedule"] != "interleaved" else len(p["balance"]))
        assert p["peak_memory_bytes"] is None  # not predicted for torch's pipelining
    assert "1f1b" in {p["schedule"] for p in plans} or "interleaved" in {p["schedule"] for p in plans}


def test_text_output_names_the_cap_the_costs_and_the_commands() -> None:
    result = _run(["plan", "resnet101", "--devices", "0,1", "--hardware", "p40", "--batch", "256", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "memory cap: 24.00 GiB per device (the p40 preset's memory)" in result.output
    assert "costs: p40 preset" in result.output
    assert "#1: gpipe-bench speed resnet101" in result.output and "published: gpipe-bench speed" in result.output


def test_chunk_choices() -> None:
    assert chunk_choices(64, 2) == [1, 2, 4, 8, 16, 32, 64]
    assert chunk_choices(27, 8, published=8) == [1, 2, 4, 8, 16]
    assert max(chunk_choices(4096, 8)) * 8 <= 2048


def test_parse_size() -> None:
    assert parse_size("24GiB") == 24 * GIB and parse_size("512MiB") == 512 << 20
    assert parse_size("2e9") == 2_000_000_000 and parse_size("1.5G") == int(1.5 * GIB)


# -- balance: planned ------------------------------------------------------------------------------------------


def _quick_job(name: str = "pipeline-2-planned") -> jobs.Job:
    table = config.load("resnet101-speed")
    quick = table.profile("quick")
    row, settings = config.apply(table, table.row(name, "quick"), quick.settings, Overrides())
    return jobs.Job(table, row, settings, "quick", ["cpu:0", "cpu:1"])


def test_planned_balance_is_the_optimum_of_its_stage_costs() -> None:
    job = _quick_job()
    costs = HardwareCosts(model_key(job), presets.load("epyc-2vcpu"))
    balance, how = planned_balance(job, costs)
    assert sum(balance) == 370 and len(balance) == 2 and "planned on cpu:0,cpu:1" in how
    search = _Search(job, costs, "gpipe-bench", None, lambda line: None)
    weights, cuts, _ = search.weights(job.row.chunks, job.row.checkpoint, 1)
    ours = max(block_cost(weights.device, balance, cuts, cuts, weights.host))
    for cut in range(1, 370):  # no other cut of two stages has a faster slowest stage
        assert ours <= max(block_cost(weights.device, (cut, 370 - cut), cuts, cuts, weights.host)) + 1e-12


def test_resolving_a_planned_row_keeps_it_marked_and_records_it() -> None:
    job = _quick_job()
    costs = HardwareCosts(model_key(job), presets.load("epyc-2vcpu"))
    resolved, _ = resolve_planned(job, costs)
    assert resolved.row.planned and resolved.row.balance is not None and sum(resolved.row.balance) == 370
    record = resolved.settings_record()
    assert record["balance_planned"] is True and record["balance"] == list(resolved.row.balance)
    assert "balance_planned" not in _quick_job("pipeline-2").settings_record()


def test_predict_plans_a_planned_row_from_its_own_costs() -> None:
    result = _run(["predict", "resnet101", "--experiment", "pipeline-2-planned", "--hardware", "p40", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "pipeline-2-planned" in result.output


def test_the_memory_estimate_is_close_to_the_exact_prediction() -> None:
    """The per-layer estimate that prunes plans is close to the exact predictor and never so far over it that pruning by it could drop a plan that fits."""
    table = config.load("resnet101-speed")
    template, published = _template(table, "quick", 2, 64, ["cpu:0", "cpu:1"], 370)
    assert published
    search = _Search(
        template, HardwareCosts(model_key(template), presets.load("epyc-2vcpu")), "gpipe-bench", None, print
    )
    for chunks, checkpoint in ((4, "never"), (8, "always"), (16, "except_last")):
        choice = Choice((180, 190), chunks, checkpoint)  # type: ignore[arg-type]
        exact = search.memory(search.job(choice))
        assert exact is not None
        assert 0.66 < search.estimated_peak(choice) / max(exact) <= OVER, (chunks, checkpoint)


def test_a_planned_row_end_to_end(tmp_path: Path) -> None:
    """The tiny quick profile's planned row: timed, planned, run, and recorded as planned."""
    configs = tiny_configs(tmp_path / "cfg")
    args = ["speed", "resnet101", "--experiment", "pipeline-2-planned", "--profile", "quick"]
    args += ["--devices", "cpu:0,cpu:1", "--epochs", "2", "--skip-epochs", "1", "--output", str(tmp_path)]
    result = _run(args, GPIPE_BENCH_CONFIGS=configs)
    assert result.exit_code == 0, result.output
    assert "planning its balance" in result.output and "planned on cpu:0,cpu:1" in result.output
    files = list(tmp_path.rglob("pipeline-2-planned.json"))
    assert len(files) == 1
    settings = json.loads(files[0].read_text())["settings"]
    assert settings["balance_planned"] is True and sum(settings["balance"]) == 370


def test_the_search_gives_workers_and_ranks_the_threads_the_engine_and_the_launcher_do() -> None:
    job = _quick_job()
    costs = HardwareCosts(model_key(job), presets.load("epyc-2vcpu"))
    ours = _Search(job, costs, "gpipe-bench", None, lambda line: None)
    assert ours.threads(2, 2) == worker_threads(list(job.devices), costs.host)
    ranks = _Search(job, costs, "distributed", None, lambda line: None)
    assert ranks.threads(2, 3) == rank_threads(3, costs.host)


def test_stage_weights_price_the_forwards_as_the_simulator_does() -> None:
    """A checkpointed micro-batch's first forward at its no-grad share (host and device), then its recompute."""
    c = LayerCost(forward=2.0, backward=4.0, forward_host=1.0, backward_host=0.5, nograd=0.25)
    for recomputed in (0.0, 0.5, 1.0):
        first_host, first = c.first_forward(True)
        host = (1 - recomputed) * 1.0 + recomputed * (first_host + 1.0) + 0.5
        device = (1 - recomputed) * 2.0 + recomputed * (first + 2.0) + 4.0
        cpu = _layer_weights([c], recomputed, gpu=False)
        assert cpu.device == [pytest.approx(host + device)] and cpu.host is None  # a CPU worker does both in turn
        gpu = _layer_weights([c], recomputed, gpu=True)
        assert gpu.device == [pytest.approx(device)] and gpu.host == [pytest.approx(host)]


def test_a_gpu_stage_costs_the_longer_of_its_device_and_host_totals() -> None:
    """max(sum device, sum host) over the stage, not the sum of per-layer maxima (which overstates a mixed stage)."""
    device, host = [4.0, 1.0, 1.0, 4.0], [1.0, 4.0, 4.0, 1.0]
    assert block_cost(device, [2, 2], host=host) == [5.0, 5.0]  # per layer maxima would give 8 and 8
    assert block_cost(device, [1, 3], host=host) == [4.0, 9.0]
    assert solve_blocks(device, 2, host=host) == [2, 2]


def test_any_device_count_is_planned_from_the_nearest_published_row() -> None:
    """Three devices: no row has three, so pipeline-4's settings start the search and nothing published is shown."""
    table = config.load("resnet101-speed")
    template, published = _template(table, "published", 3, None, ["cuda:0", "cuda:1", "cuda:2"], 370)
    four = table.row("pipeline-4")
    assert not published and template.row.balance == (124, 123, 123) and template.row.devices == 3
    assert (template.row.batch, template.row.chunks, template.row.checkpoint) == (
        four.batch,
        four.chunks,
        four.checkpoint,
    )
    records = _plan_devices("0,1,2")
    assert [r["rank"] for r in records] == [1, 2, 3]  # no published configuration (rank 0) beside them
    assert all(len(r["balance"]) == 3 and sum(r["balance"]) == 370 for r in records)


def _plan_devices(devices: str) -> List[Dict[str, Any]]:
    args = ["plan", "resnet101", "--devices", devices, "--hardware", "p40", "--format", "json", "--quiet"]
    result = _run(args)
    assert result.exit_code == 0, result.output
    records: List[Dict[str, Any]] = json.loads(result.output)
    return records
