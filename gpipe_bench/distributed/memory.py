"""A memory row on torch's pipelining: each rank's peak activation memory over the training steps.

Per rank, as for our engine: on CUDA the allocator's peak reserved memory
minus the stage's model memory; on CPU the bytes held by tensors
(:class:`~gpipe_bench.memory.tracker.TensorMemory`), gradients and optimizer
state left out. torch's schedules keep every micro-batch's activations (no
recomputation), so this is where 1F1B's smaller working set shows: it starts
backward passes before all forwards are done.
"""
from __future__ import annotations

import gc
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from gpipe_bench import models
from gpipe_bench.bench.memory import GIB, MemoryJob, _extra, _model_state, _optimizer
from gpipe_bench.bench.speed import model_args, model_name, settings_record
from gpipe_bench.memory.tracker import TensorMemory
from gpipe_bench.environment import environment
from gpipe_bench.results import Result

from .speed import prepare

__all__ = ["run_rank"]


def run_rank(job: MemoryJob, schedule: str, timeout_s: float = 300.0) -> Optional[Result]:
    """This rank's part of the memory row; the Result (per-rank peaks) on rank 0, None elsewhere."""
    run = prepare(job, schedule, timeout_s)
    device, size, balance = run.device, run.size, run.balance
    stage = torch.nn.ModuleList(run.stages.values())  # this rank's parameters, for the optimizer and the meter
    optimizer = _optimizer(job, stage)
    width, copies = int(_extra(job, "bytes_per_parameter", 4)), int(_extra(job, "parameter_copies", 3))
    model_bytes = sum(p.numel() for p in stage.parameters()) * width * copies
    steps = int(_extra(job, "steps", 2))

    def train(meter: Optional[TensorMemory]) -> None:
        x, y = run.batch(job)  # made here, so that on CPU the meter counts the input too
        for _ in range(steps):
            optimizer.zero_grad()
            run.step(x, y)
            optimizer.step()
            if meter is not None:
                meter.exclude(_model_state(stage, optimizer))

    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        train(None)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_reserved(device) - model_bytes
    else:
        meter = TensorMemory()
        with meter:
            train(meter)
        curve = meter.curves().get(0)
        peak = curve.peak if curve is not None else 0
    peaks: List[Any] = [None] * size
    dist.all_gather_object(peaks, (int(peak), int(model_bytes)))
    if run.rank != 0:
        return None
    layers, params = models.count(model_name(job), **model_args(job))
    settings: Dict[str, Any] = settings_record(job)
    settings.update(devices=[f"{device.type}:rank{r}" for r in range(size)], balance=balance, schedule=schedule,
                    processes=size, steps=steps, stages_per_process=len(balance) // size)
    extra: Dict[str, Any] = {
        "layers": layers, "parameters": params, "model_memory_gib": params * width * copies / GIB,
        "devices": [f"rank {r}" for r in range(size)],
        "model_memory_per_device_gib": [m / GIB for _, m in peaks],
        "measured_per_device_gib": [p / GIB for p, _ in peaks],
        # The same words as our engine's rows: the table's footnote lists each method once.
        "method": ("CUDA max_memory_reserved minus model memory" if device.type == "cuda"
                   else "bytes held by tensors (TensorMemory), model state excluded"),
        "schedule": schedule, "processes": size,
    }
    return Result(
        table=job.table.name, experiment=job.row.name, profile=job.profile, engine=f"distributed-{schedule}",
        kind="memory", metric=job.table.metric, unit=job.table.unit, value=sum(p for p, _ in peaks) / GIB,
        status="ok", settings=settings, environment=environment([str(device)] if device.type == "cuda" else []),
        extra=extra, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
