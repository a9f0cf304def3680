"""Where a prediction's inputs come from: the rows as jobs on the devices predicted, and the costs' source.

Why a module of its own: ``gpipe-bench predict`` (:mod:`.run`) and ``gpipe-bench
plan`` (:mod:`.plan`) turn rows into jobs and a preset into costs the same way,
and each imports this rather than the other.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from gpipe_bench import config, devices, jobs
from gpipe_bench.config import Overrides, Row, Table
from gpipe_bench.distributed import schedule as dschedule
from gpipe_bench.errors import HarnessError

from . import hardware as presets
from .costs import HardwareCosts, ModelKey
from .rows import calibrate

__all__ = ["check_precision", "for_gpus", "parse_calibration", "predicted_devices", "predicted_jobs", "preset_costs"]


def for_gpus(preset: Optional[presets.Hardware]) -> bool:
    """Whether a prediction is for GPUs: the preset's kind, or this machine's when its costs are measured here.

    It picks the profile a prediction or a plan defaults to (:func:`gpipe_bench.jobs.default_profile`).
    """
    return preset.device_type == "cuda" if preset is not None else torch.cuda.is_available()


def check_precision(job: jobs.Job, preset: Optional[presets.Hardware]) -> jobs.Job:
    """``job`` if its precision can be predicted; else one error line naming the precisions that can.

    On a preset: what the preset's device runs and has a rate for
    (:func:`.hardware.check_precision`). Measured here: what this machine's devices run,
    as a run of the row would be refused (:func:`gpipe_bench.jobs.check_precision`).
    Either way, what the engine runs (:func:`gpipe_bench.jobs.check_engine_precision`).
    """
    if preset is None:
        return jobs.check_precision(job)
    presets.check_precision(preset, job.row.precision)
    return jobs.check_engine_precision(job)


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


def predicted_devices(preset: Optional[presets.Hardware], spec: Optional[str], count: int) -> List[str]:
    """The devices a row is predicted on: those given, else ``count`` of the preset's kind (or of this machine)."""
    if spec:
        given = devices.parse(spec)[:count]
        if len(given) < count:
            raise HarnessError(f"{len(given)} device(s) given for {count} partitions; give {count}", param="--devices")
        return given
    if preset is not None:
        return [f"{preset.device_type}:{j}" for j in range(count)]
    return list(devices.resolve(None, count).devices)


def predicted_jobs(
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
            out.append(check_precision(jobs.Job(table, row, settings, profile, ranks, "distributed", schedule), preset))
            continue
        ours = engine if engine == "torchgpipe" else "gpipe-bench"  # the engines of this process
        placed = predicted_devices(preset, devices_spec, count)
        out.append(check_precision(jobs.Job(table, row, settings, profile, placed, ours), preset))
    return out


def preset_costs(
    table: Table,
    profile: str,
    key: ModelKey,
    preset: presets.Hardware,
    calibration: Optional[Tuple[str, float]],
    devices_spec: Optional[str] = None,
    host_speed: float = 1.0,
) -> Tuple[HardwareCosts, Optional[Tuple[str, float, float]]]:
    """(costs, (row, throughput, efficiency) fitted or None): a preset's costs, calibrated on a row of the table.

    ``host_speed``: the target host's speed per core against this one's (``--host-speed``).
    """
    if calibration is None:
        return HardwareCosts(key, preset, host_speed=host_speed), None
    name, figure = calibration
    chosen = table.profile(profile)
    match = [r for r in chosen.rows if r.name == name]
    if not match:
        raise HarnessError(
            f"no row {name!r} in {table.name} ({profile}); calibrate on one of: "
            + ", ".join(r.name for r in chosen.rows),
            param="--calibrate",
        )
    job = predicted_jobs(table, profile, match, Overrides(), devices_spec, preset, "gpipe-bench", "gpipe", None)[0]
    efficiency, costs = calibrate(
        job, figure, lambda e: HardwareCosts(key, preset, e, f"{name}={figure:g}", host_speed=host_speed)
    )
    assert isinstance(costs, HardwareCosts)
    return costs, (name, figure, efficiency)
