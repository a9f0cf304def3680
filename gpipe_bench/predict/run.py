"""Predict a table's rows: pick the cost source, fit its one efficiency if asked, simulate every row.

Why a module of its own: ``gpipe-bench predict`` and the regression check in
``gpipe-bench compare`` ask the same question (these rows, these costs: what
throughput and speedup?) and must get the same answer. The command line only
parses options and prints what :func:`predict_table` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from gpipe_bench import jobs
from gpipe_bench.config import Overrides, Row, Table
from gpipe_bench.errors import HarnessError
from gpipe_bench.memory.allocator import ERA_CURRENT, AllocatorSettings
from gpipe_bench.memory.predict import Prediction, predict_job
from gpipe_bench.memory.reserved import allocator_for
from gpipe_bench.precision import DEFAULT

from . import hardware as presets
from .costs import Costs, MeasuredCosts
from .hardware import Hardware
from .plan import resolve_planned
from .rows import RowPrediction, cost_sizes, meta_model, model_key, predict
from .sources import parse_calibration, predicted_jobs, preset_costs

__all__ = [
    "PredictedSpeedups",
    "TablePrediction",
    "predict_table",
    "predicted_speedups",
    "ENGINES",
]

ENGINES = ("gpipe-bench", "torchgpipe", "distributed")


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
    precision: str = DEFAULT  # the rows' (one cost source: one precision)


def predict_table(
    table: Table,
    profile: str,
    rows: Sequence[Row],
    overrides: Overrides,
    devices_spec: Optional[str],
    *,
    hardware: Optional[Union[str, Hardware]],
    calibration: Optional[Tuple[str, float]] = None,
    engine: str = "gpipe-bench",
    schedule: str = "gpipe",
    nproc: Optional[int] = None,
    memory: bool = True,
    progress: Callable[[str], None] = lambda line: None,
    host_speed: float = 1.0,
) -> TablePrediction:
    """Predict ``rows`` of ``table``: with ``hardware``'s preset (a name, or one's own: nothing runs), or timed here
    when None."""
    if engine not in ENGINES:
        raise HarnessError(f"predict models the engines {', '.join(ENGINES)}, not {engine!r}", param="--engine")
    preset = presets.load(hardware) if hardware is not None else None
    planned = predicted_jobs(table, profile, rows, overrides, devices_spec, preset, engine, schedule, nproc)
    chosen = table.profile(profile)
    base_row = next((r for r in chosen.rows if r.name == table.baseline), None)
    baseline: Optional[jobs.Job] = None
    if base_row is not None:
        baseline = next((j for j in planned if j.row.name == base_row.name), None)
        if baseline is None:
            baseline = predicted_jobs(
                table,
                profile,
                [base_row],
                Overrides(precision=overrides.precision),
                devices_spec,
                preset,
                "gpipe-bench",
                schedule,
                None,
            )[0]
    key = model_key(planned[0])
    fitted: Optional[Tuple[str, float, float]] = None
    costs: Costs
    if preset is not None:
        costs, fitted = preset_costs(table, profile, key, preset, calibration, devices_spec, host_speed)
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
    planned = [resolve_planned(j, costs)[0] if j.row.planned and j.row.balance is None else j for j in planned]
    progress(f"simulating {len(planned)} row(s)")
    predictions = predict(planned, costs, baseline)
    if memory:
        progress("predicting peak memory per device (meta)")
        meta = meta_model(key)
        allocator = allocator_for(ERA_CURRENT, [d for p in predictions for d in p.job.devices])
        for p in predictions:
            prediction = _memory(p.job, meta, allocator)
            if prediction is not None:
                p.memory, p.reserved, p.allocated = (
                    list(prediction.per_device),
                    prediction.reserved,
                    prediction.allocated,
                )
    name = preset.name if preset is not None else None
    return TablePrediction(table, profile, costs.description, name, predictions, fitted, key.precision)


def _memory(job: jobs.Job, meta: torch.nn.Sequential, allocator: Optional[AllocatorSettings]) -> Optional[Prediction]:
    """Peak activation bytes per device from the memory predictor (our engine's rows only); on GPU rows also
    what the caching allocator would reserve (today's allocator, ``PYTORCH_CUDA_ALLOC_CONF`` as set)."""
    if job.engine == "distributed":
        return None
    balance = tuple(job.row.balance) if job.row.balance and job.split else None
    return predict_job(job, balance or (), model=meta, allocator=allocator)


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
