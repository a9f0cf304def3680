"""torch.distributed.pipelining as an engine: this process's stages of a row, under torchrun.

Every rank builds only its own stages (:mod:`gpipe_bench.distributed.stages`)
and drives them with the row's schedule (:mod:`gpipe_bench.distributed.schedule`).
The measurement loops see one :class:`~gpipe_bench.engines.base.Trainer` per
rank: rank 0 feeds the inputs and writes the record, the last rank holds the
labels, and the loops' barriers, maxima and gathers are the process group's.
The first step infers the stages' shapes, so it is run before any figure.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gpipe_bench import models
from gpipe_bench.distributed.schedule import make_schedule, step
from gpipe_bench.distributed.stages import build_local
from gpipe_bench.errors import HarnessError
from gpipe_bench.jobs import Job

from .base import MemoryWatch, Trainer

__all__ = ["DistributedTrainer", "rank_device"]


def rank_device() -> torch.device:
    """This rank's device: GPU LOCAL_RANK where CUDA is present (NCCL), else the CPU (gloo)."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if local >= count:
            raise HarnessError(
                f"local rank {local} has no GPU: this host has {count}; launch at most --nproc "
                f"{count} per host, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPU processes"
            )
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


class DistributedTrainer(Trainer):
    """This rank's stages of the row under the job's schedule."""

    warm_up_steps = 1

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.device = rank_device()
        if not dist.is_initialized():
            # NCCL: bind the group to this rank's GPU (collectives on device tensors, no guessing).
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo",
                timeout=timedelta(seconds=job.timeout_s),
                device_id=self.device if self.device.type == "cuda" else None,
            )
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.reporter = self.rank == 0
        name, args = job.model_name, job.model_args
        self.balance = list(job.row.balance) if job.row.balance else [models.count(name, **args)[0]]
        self.stages = build_local(name, self.balance, self.rank, self.size, job.schedule, self.device, seed=0, **args)
        for stage in self.stages.values():
            stage.train()
        self.pipe = make_schedule(
            self.stages,
            self.rank,
            self.size,
            self.device,
            job.row.chunks,
            job.schedule,
            F.cross_entropy,
            stages=len(self.balance),
        )

    def parameters(self) -> List[nn.Parameter]:
        return [p for stage in self.stages.values() for p in stage.parameters()]

    def batch(self, watch: Optional[MemoryWatch] = None) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        s, row = self.job.settings, self.job.row
        torch.manual_seed(0)
        x = torch.rand(row.batch, 3, s.input_size, s.input_size, device=self.device) if self.rank == 0 else None
        y = torch.randint(0, s.classes, (row.batch,), device=self.device) if self.rank == self.size - 1 else None
        return x, y

    def step(self, x: Optional[Tensor], y: Optional[Tensor]) -> None:
        step(self.pipe, self.rank, self.size, x, y)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        dist.barrier()

    def slowest(self, seconds: float) -> float:
        # On the rank's device: an NCCL group has no CPU backend.
        elapsed = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed.item())

    def gather(self, value: Any) -> List[Any]:
        out: List[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def memory_devices(self) -> List[str]:
        return [str(self.device)]

    def memory_parts(self) -> List[Tuple[int, nn.Module]]:
        return [(0, stage) for stage in self.stages.values()]

    def meter_owner(self) -> int:
        return 0

    def record_settings(self) -> Dict[str, Any]:
        return {
            "devices": [f"{self.device.type}:rank{r}" for r in range(self.size)],
            "balance": self.balance,
            "schedule": self.job.schedule,
            "processes": self.size,
            "stages_per_process": len(self.balance) // self.size,
        }

    def record_extra(self) -> Dict[str, Any]:
        return {"processes": self.size, "schedule": self.job.schedule, "launcher": "torchrun"}

    def environment_devices(self) -> List[str]:
        return [str(self.device)] if self.device.type == "cuda" else []
