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
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gpipe_bench import models

from gpipe_bench.bench.speed import Progress, SpeedJob, model_args, model_name, settings_record
from gpipe_bench.errors import HarnessError
from gpipe_bench.environment import environment
from gpipe_bench.results import Result

from .schedule import make_schedule, step
from .stages import build_local

__all__ = ["in_torchrun", "world", "rank", "RankRun", "prepare", "run_rank"]


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _device() -> torch.device:
    """This rank's device: GPU LOCAL_RANK where CUDA is present (NCCL), else the CPU (gloo)."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if local >= count:
            raise HarnessError(f"local rank {local} has no GPU: this host has {count}; launch at most --nproc "
                                   f"{count} per host, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPU processes")
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


@dataclass(frozen=True)
class RankRun:
    """This rank's part of a row under a schedule: where it runs, its stages and the schedule driving them."""

    device: torch.device
    rank: int
    size: int
    balance: List[int]
    stages: Dict[int, nn.Module]
    pipe: Any

    def parameters(self) -> List[nn.Parameter]:
        return [p for stage in self.stages.values() for p in stage.parameters()]

    def batch(self, job: SpeedJob) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The row's fixed synthetic mini-batch: the input on the first rank, the labels on the last."""
        s = job.settings
        torch.manual_seed(0)
        x = torch.rand(job.row.batch, 3, s.input_size, s.input_size, device=self.device) if self.rank == 0 else None
        y = (torch.randint(0, s.classes, (job.row.batch,), device=self.device)
             if self.rank == self.size - 1 else None)
        return x, y

    def step(self, x: Optional[Tensor], y: Optional[Tensor]) -> None:
        step(self.pipe, self.rank, self.size, x, y)


def prepare(job: SpeedJob, schedule: str, timeout_s: float = 300.0) -> RankRun:
    """Join the process group (once), build this rank's stages of the row and their schedule."""
    device = _device()
    if not dist.is_initialized():
        # NCCL: bind the group to this rank's GPU (collectives on device tensors, no guessing).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    me, size = dist.get_rank(), dist.get_world_size()
    name, args = model_name(job), model_args(job)
    balance = list(job.row.balance) if job.row.balance else [models.count(name, **args)[0]]
    stages = build_local(name, balance, me, size, schedule, device, seed=0, **args)
    for stage in stages.values():
        stage.train()
    pipe = make_schedule(stages, me, size, device, job.row.chunks, schedule, F.cross_entropy, stages=len(balance))
    return RankRun(device, me, size, balance, stages, pipe)


def run_rank(job: SpeedJob, schedule: str, progress: Optional[Progress] = None, timeout_s: float = 300.0) -> Optional[Result]:
    """This rank's part of the row; the Result on rank 0, None elsewhere."""
    run = prepare(job, schedule, timeout_s)
    device, me, row, s = run.device, run.rank, job.row, job.settings
    optimizer = torch.optim.SGD(run.parameters(), lr=float(s.optimizer.get("lr", 0.1)))
    x, y = run.batch(job)

    def one_step() -> None:
        optimizer.zero_grad()
        run.step(x, y)
        optimizer.step()

    one_step()  # shape inference happens here: kept out of the figures
    steps = s.dataset_size // row.batch
    throughputs: List[float] = []
    for epoch in range(s.epochs):
        dist.barrier()
        start = time.perf_counter()
        for k in range(steps):
            one_step()
            if progress is not None and me == 0:
                progress(epoch, k + 1, steps, (k + 1) * row.batch / (time.perf_counter() - start))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # On the rank's device: an NCCL group has no CPU backend.
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if epoch >= s.skip_epochs:
            throughputs.append(steps * row.batch / float(elapsed))
    dist.barrier()
    if me != 0:
        return None
    spread: Dict[str, float] = {}
    if throughputs:
        spread = {"min": min(throughputs), "max": max(throughputs), "median": statistics.median(throughputs),
                  "std": statistics.stdev(throughputs) if len(throughputs) > 1 else 0.0}
    settings: Dict[str, Any] = settings_record(job)
    settings.update(devices=[f"{device.type}:rank{r}" for r in range(run.size)], balance=run.balance,
                    schedule=schedule, processes=run.size, stages_per_process=len(run.balance) // run.size)
    return Result(
        table=job.table.name, experiment=row.name, profile=job.profile, engine=f"distributed-{schedule}", kind="speed",
        metric=job.table.metric, unit=job.table.unit, value=statistics.fmean(throughputs) if throughputs else None,
        status="ok", samples=throughputs, spread=spread, settings=settings,
        environment=environment([str(device)] if device.type == "cuda" else []),
        extra={"processes": run.size, "schedule": schedule, "launcher": "torchrun"},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
