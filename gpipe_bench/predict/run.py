"""Predict a table's rows: pick the cost source, fit its one efficiency if asked, simulate every row.

Why a module of its own: ``gpipe-bench predict`` and the regression check in
``gpipe-bench compare`` ask the same question (these rows, these costs: what
throughput and speedup?) and must get the same answer. The command line only
parses options and prints what :func:`predict_table` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from gpipe_bench import config, jobs
from gpipe_bench.config import Overrides, Row, Table
from gpipe_bench.errors import HarnessError

from . import hardware as presets
from .costs import Costs, HardwareCosts, MeasuredCosts, ModelKey
from .rows import RowPrediction, calibrate, cost_sizes, meta_model, model_key, predict

__all__ = [
    "PredictedSpeedups",
    "TablePrediction",
    "parse_calibration",
    "predict_table",
    "predicted_speedups",
    "preset_costs",
    "ENGINES",
]

ENGINES = ("gpipe-bench", "distributed")


@dataclass
class PredictedSpeedups:
    """Speedups predicted for the published rows on a hardware preset (``gpipe-bench predict``), to set beside them.

    ``checked``: the table's config says the predictions meet their tolerance, so
    one that leaves it is a regression of the engine's schedule or of the cost model.
    """

    hardware: str
    costs: str
    speedups: Dict[str, float]
    checked: bool


@dataclass
class TablePrediction:
    """The rows of one table predicted with one cost source."""

    table: Table
    profile: str
    costs: str  # how the costs were obtained, in words
    hardware: Optional[str]  # the preset's name, or None when measured here
    rows: List[RowPrediction]
    fitted: Optional[Tuple[str, float, float]] = None  # (row, its throughput, the efficiency)


def parse_calibration(value: Optional[str]) -> Optional[Tuple[str, float]]:
    """``ROW=THROUGHPUT`` as (row, throughput); one clear error for anything else."""
    if value is None:
        return None
    name, sep, figure = value.partition("=")
    try:
        throughput = float(figure)
    except ValueError:
        throughput = -1.0
    if not sep or not name or throughput <= 0:
        raise HarnessError(
            f"{value!r} is not ROW=THROUGHPUT; give e.g. --calibrate naive-1=92.539 (samples/s)", param="--calibrate"
        )
    return name, throughput


def _devices_for(preset: Optional[presets.Hardware], spec: Optional[str], count: int) -> List[str]:
    """The devices a row is predicted on: those given, else ``count`` of the preset's kind (or of this machine)."""
    from gpipe_bench import devices

    if spec:
        given = devices.parse(spec)[:count]
        if len(given) < count:
            raise HarnessError(f"{len(given)} device(s) given for {count} partitions; give {count}", param="--devices")
        return given
    if preset is not None:
        kind = "cpu" if preset.kind == "cpu" else "cuda"
        return [f"{kind}:{j}" for j in range(count)]
    return list(devices.resolve(None, count).devices)


def _plan(
    table: Table,
    profile: str,
    rows: Sequence[Row],
    overrides: Overrides,
    devices_spec: Optional[str],
    preset: Optional[presets.Hardware],
    engine: str,
    schedule: str,
    nproc: Optional[int],
) -> List[jobs.Job]:
    chosen = table.profile(profile)
    out = []
    for row in rows:
        row, settings = config.apply(table, row, chosen.settings, overrides, model=chosen.model)
        count = jobs.partitions(row)
        if engine == "distributed" and count > 1:
            from gpipe_bench.distributed import schedule as dschedule

            processes = nproc or dschedule.default_processes(schedule, count)
            problem = dschedule.check(schedule, count, processes, row.chunks)
            if problem is not None:
                raise HarnessError(f"{row.name}: {problem}", param="--schedule")
            if row.batch % row.chunks:
                raise HarnessError(
                    f"{row.name}: batch {row.batch} is not divisible by chunks {row.chunks} (torch's pipelining "
                    "needs equal micro-batches); give --batch-size or --chunks that divide",
                    param="--chunks",
                )
            ranks = [f"rank{r}" for r in range(processes)]
            out.append(jobs.Job(table, row, settings, profile, ranks, "distributed", schedule))
            continue
        out.append(jobs.Job(table, row, settings, profile, _devices_for(preset, devices_spec, count), "gpipe-bench"))
    return out


def predict_table(
    table: Table,
    profile: str,
    rows: Sequence[Row],
    overrides: Overrides,
    devices_spec: Optional[str],
    *,
    hardware: Optional[str],
    calibration: Optional[Tuple[str, float]] = None,
    engine: str = "gpipe-bench",
    schedule: str = "gpipe",
    nproc: Optional[int] = None,
    memory: bool = True,
    progress: Callable[[str], None] = lambda line: None,
) -> TablePrediction:
    """Predict ``rows`` of ``table``: with ``hardware``'s preset (nothing runs), or timed here when None."""
    if engine not in ENGINES:
        raise HarnessError(f"predict models the engines {', '.join(ENGINES)}, not {engine!r}", param="--engine")
    preset = presets.load(hardware) if hardware is not None else None
    planned = _plan(table, profile, rows, overrides, devices_spec, preset, engine, schedule, nproc)
    chosen = table.profile(profile)
    base_row = next((r for r in chosen.rows if r.name == table.baseline), None)
    baseline: Optional[jobs.Job] = None
    if base_row is not None:
        baseline = next((j for j in planned if j.row.name == base_row.name), None)
        if baseline is None:
            baseline = _plan(
                table, profile, [base_row], Overrides(), devices_spec, preset, "gpipe-bench", schedule, None
            )[0]
    key = model_key(planned[0])
    fitted: Optional[Tuple[str, float, float]] = None
    costs: Costs
    if preset is not None:
        costs, fitted = preset_costs(table, profile, key, preset, calibration, devices_spec)
    else:
        if calibration is not None:
            raise HarnessError(
                "--calibrate fits a hardware preset's efficiency; with measured costs there is nothing to fit "
                "(give --hardware NAME, or leave --calibrate out)",
                param="--calibrate",
            )
        costs = MeasuredCosts.here(key)
        sizes = [s for job in [*planned, *([baseline] if baseline else [])] for s in cost_sizes(job, costs.host)]
        concurrent = any(job.split and job.row.chunks > 1 and len(set(job.devices)) > 1 for job in planned)
        costs.prepare(sizes, progress, concurrent)
    # Rows whose balance is planned get it from these costs, as a run would from its own timing.
    planned = [jobs.resolve_planned(j, costs)[0] if j.row.planned and j.row.balance is None else j for j in planned]
    progress(f"simulating {len(planned)} row(s)")
    predictions = predict(planned, costs, baseline)
    if memory:
        progress("predicting peak memory per device (meta)")
        meta = meta_model(key)
        for p in predictions:
            p.memory = _memory(p.job, meta)
    return TablePrediction(table, profile, costs.description, hardware, predictions, fitted)


def _memory(job: jobs.Job, meta: torch.nn.Sequential) -> Optional[List[int]]:
    """Peak activation bytes per device from the memory predictor (our engine's rows only)."""
    if job.engine == "distributed":
        return None
    from gpipe_bench.measure import memory

    balance = tuple(job.row.balance) if job.row.balance and job.split else None
    prediction = memory.predict(job, balance or (), model=meta)
    return list(prediction.per_device)


def preset_costs(
    table: Table,
    profile: str,
    key: ModelKey,
    preset: presets.Hardware,
    calibration: Optional[Tuple[str, float]],
    devices_spec: Optional[str] = None,
) -> Tuple[HardwareCosts, Optional[Tuple[str, float, float]]]:
    """(costs, (row, throughput, efficiency) fitted or None): a preset's costs, calibrated on a row of the table."""
    if calibration is None:
        return HardwareCosts(key, preset), None
    name, figure = calibration
    chosen = table.profile(profile)
    match = [r for r in chosen.rows if r.name == name]
    if not match:
        raise HarnessError(
            f"no row {name!r} in {table.name} ({profile}); calibrate on one of: "
            + ", ".join(r.name for r in chosen.rows),
            param="--calibrate",
        )
    job = _plan(table, profile, match, Overrides(), devices_spec, preset, "gpipe-bench", "gpipe", None)[0]
    efficiency, costs = calibrate(job, figure, lambda e: HardwareCosts(key, preset, e, f"{name}={figure:g}"))
    assert isinstance(costs, HardwareCosts)
    return costs, (name, figure, efficiency)


def predicted_speedups(table: Table) -> PredictedSpeedups:
    """The published rows predicted as the table's ``compare.predicted`` says (no memory column: seconds)."""
    spec = table.predicted
    rows = [r for r in table.profile("published").rows if not r.planned]  # nothing published to check them by
    prediction = predict_table(
        table,
        "published",
        rows,
        Overrides(),
        None,
        hardware=str(spec["hardware"]),
        calibration=parse_calibration(str(spec["calibrate"])) if spec.get("calibrate") else None,
        memory=False,
    )
    speedups = {p.job.row.name: p.speedup for p in prediction.rows if p.speedup is not None}
    return PredictedSpeedups(str(spec["hardware"]), prediction.costs, speedups, bool(spec.get("check")))
