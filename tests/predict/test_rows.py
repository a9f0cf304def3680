"""A row's predicted step: cells from the harness's rules, the engine's schedule, the fitted efficiency."""

from __future__ import annotations

import pytest

from gpipe_bench import config, jobs
from gpipe_bench.config import Overrides
from gpipe_bench.errors import HarnessError
from gpipe_bench.predict import hardware
from gpipe_bench.predict.costs import HardwareCosts
from gpipe_bench.predict.rows import calibrate, cost_sizes, model_key, predict, step
from gpipe_bench.predict.simulate import rank_threads, worker_threads


def _job(name: str, devices: list, profile: str = "published", engine: str = "gpipe-bench", **over: object) -> jobs.Job:
    table = config.load("resnet101-speed")
    chosen = table.profile(profile)
    row, settings = config.apply(
        table, table.row(name, profile), chosen.settings, Overrides(**over), model=chosen.model
    )  # type: ignore[arg-type]
    return jobs.Job(table, row, settings, profile, devices, engine, "gpipe")


def test_a_pipeline_row_has_its_cells_and_recomputes() -> None:
    job = _job("pipeline-2", ["cuda:0", "cuda:1"], batch=64, chunks=4)
    costs = HardwareCosts(model_key(job), hardware.load("p40"))
    out = step(job, costs)
    spans = out.timeline.spans
    assert sum(1 for s in spans if s.phase == "forward") == 8
    assert sum(1 for s in spans if s.phase == "backward") == 8
    assert sum(1 for s in spans if s.phase == "recompute") == 6  # except_last: 3 micro-batches x 2 partitions
    assert sum(1 for s in spans if s.phase == "copy") == 8  # each boundary both ways
    assert out.seconds > 0


def test_more_micro_batches_shrink_the_bubble() -> None:
    costs = None
    bubbles = []
    for chunks in (2, 8, 32):
        job = _job("pipeline-4", [f"cuda:{k}" for k in range(4)], batch=256, chunks=chunks, checkpoint="never")
        costs = costs or HardwareCosts(model_key(job), hardware.load("v100"))
        bubbles.append(step(job, costs).bubble)
    assert bubbles[0] > bubbles[1] > bubbles[2]


def test_speedups_are_against_the_baseline_row() -> None:
    base = _job("naive-1", ["cuda:0"])
    p8 = _job("pipeline-8", [f"cuda:{k}" for k in range(8)])
    costs = HardwareCosts(model_key(base), hardware.load("p40"))
    out = predict([base, p8], costs, base)
    assert out[0].speedup == pytest.approx(1.0)
    assert out[1].speedup is not None and out[1].speedup > 2.0


def test_calibration_reaches_the_figure() -> None:
    base = _job("naive-1", ["cuda:0"])
    key = model_key(base)
    efficiency, costs = calibrate(base, 50.0, lambda e: HardwareCosts(key, hardware.load("a100"), e))
    assert base.row.batch / step(base, costs).seconds == pytest.approx(50.0, rel=1e-3)
    assert 0 < efficiency < 1


def test_an_unreachable_calibration_is_an_error() -> None:
    base = _job("naive-1", ["cuda:0"])
    key = model_key(base)
    with pytest.raises(HarnessError, match="cannot be reached"):
        calibrate(base, 1e9, lambda e: HardwareCosts(key, hardware.load("p40"), e))


def test_a_balance_that_does_not_cover_the_model_is_an_error() -> None:
    job = _job("pipeline-2", ["cuda:0", "cuda:1"])
    object.__setattr__(job.row, "balance", (10, 10))
    with pytest.raises(HarnessError, match="370"):
        step(job, HardwareCosts(model_key(job), hardware.load("p40")))


def test_cost_sizes_follow_the_worker_threads() -> None:
    host = HardwareCosts(model_key(_job("naive-1", ["cpu"])), hardware.load("epyc-2vcpu")).host
    assert cost_sizes(_job("naive-1", ["cpu"], profile="quick"), host) == [(16, host.threads)]
    sizes = cost_sizes(_job("pipeline-2", ["cpu:0", "cpu:1"], profile="quick"), host)
    assert sizes == [(16, worker_threads(["cpu:0", "cpu:1"], host))]
    # Ranks of a launch: the launcher's rule, whatever their devices.
    ranks = _job("pipeline-2", ["rank0", "rank1"], profile="quick", engine="distributed")
    assert cost_sizes(ranks, host) == [(16, rank_threads(2, host))]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_distributed_rows_run_each_stage_on_its_rank(schedule: str) -> None:
    table = config.load("resnet101-speed")
    chosen = table.profile("published")
    row, settings = config.apply(
        table, table.row("pipeline-4"), chosen.settings, Overrides(chunks=8, batch=128), model=chosen.model
    )
    job = jobs.Job(table, row, settings, "published", [f"rank{r}" for r in range(4)], "distributed", schedule)
    costs = HardwareCosts(model_key(job), hardware.load("h100"))
    out = step(job, costs)
    assert out.devices == [f"rank{r} cuda:{r}" for r in range(4)]
    assert sum(1 for s in out.timeline.spans if s.phase == "forward") == 4 * 8
