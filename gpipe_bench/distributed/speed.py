"""A speed row on torch's pipelining, one process per stage, launched by torchrun.

Every rank builds its own stage and runs the row's steps under the schedule;
the epoch time is the slowest rank's (an all-reduce of the elapsed times), so
the figure is what the whole pipeline sustains. The first step is run before
timing (the schedule infers shapes then). Rank 0 builds the one result record;
the other ranks return None and write nothing.
"""
from __future__ import annotations

import os
import statistics
import time
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpipe_bench.bench.speed import Progress, SpeedJob, model_args, model_name, settings_record
from gpipe_bench.results import Result, environment

from .schedule import make_schedule, step
from .stages import build_local

__all__ = ["in_torchrun", "world", "run_rank"]


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _device() -> torch.device:
    """This rank's device: GPU LOCAL_RANK where CUDA is present (NCCL), else the CPU (gloo)."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if local >= count:
            import click

            raise click.UsageError(f"local rank {local} has no GPU: this host has {count}; launch at most --nproc "
                                   f"{count} per host, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPU processes")
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def run_rank(job: SpeedJob, schedule: str, progress: Optional[Progress] = None, timeout_s: float = 300.0) -> Optional[Result]:
    """This rank's part of the row; the Result on rank 0, None elsewhere."""
    device = _device()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    rank, size = dist.get_rank(), dist.get_world_size()
    row, s = job.row, job.settings
    balance = list(row.balance) if row.balance else None
    if balance is None:
        from gpipe_bench import models

        balance = [models.count(model_name(job), **model_args(job))[0]]
    torch.manual_seed(0)
    stages = build_local(model_name(job), balance, rank, size, schedule, device, seed=0, **model_args(job))
    for stage in stages.values():
        stage.train()
    pipe = make_schedule(stages, rank, size, device, row.chunks, schedule, F.cross_entropy, stages=len(balance))
    parameters = [p for stage in stages.values() for p in stage.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=float(s.optimizer.get("lr", 0.1)))
    x = torch.rand(row.batch, 3, s.input_size, s.input_size, device=device) if rank == 0 else None
    y = torch.randint(0, s.classes, (row.batch,), device=device) if rank == size - 1 else None

    def one_step() -> None:
        optimizer.zero_grad()
        step(pipe, rank, size, x, y)
        optimizer.step()

    one_step()  # shape inference happens here: kept out of the figures
    steps = s.dataset_size // row.batch
    throughputs: List[float] = []
    for epoch in range(s.epochs):
        dist.barrier()
        start = time.perf_counter()
        for k in range(steps):
            one_step()
            if progress is not None and rank == 0:
                progress(epoch, k + 1, steps, (k + 1) * row.batch / (time.perf_counter() - start))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if epoch >= s.skip_epochs:
            throughputs.append(steps * row.batch / float(elapsed))
    dist.barrier()
    if rank != 0:
        return None
    spread: Dict[str, float] = {}
    if throughputs:
        spread = {"min": min(throughputs), "max": max(throughputs), "median": statistics.median(throughputs),
                  "std": statistics.stdev(throughputs) if len(throughputs) > 1 else 0.0}
    settings: Dict[str, Any] = settings_record(job)
    settings.update(devices=[f"{device.type}:rank{r}" for r in range(size)], balance=balance, schedule=schedule,
                    processes=size, stages_per_process=len(balance) // size)
    return Result(
        table=job.table.name, experiment=row.name, profile=job.profile, engine=f"distributed-{schedule}", kind="speed",
        metric=job.table.metric, unit=job.table.unit, value=statistics.fmean(throughputs) if throughputs else None,
        status="ok", samples=throughputs, spread=spread, settings=settings,
        environment=environment([str(device)] if device.type == "cuda" else []),
        extra={"processes": size, "schedule": schedule, "launcher": "torchrun"},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
