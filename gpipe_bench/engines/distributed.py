"""torch.distributed.pipelining as an engine: this process's stages of a row, under torchrun.

Every rank builds only its own stages (:mod:`gpipe_bench.distributed.stages`)
and drives them with the row's schedule (:mod:`gpipe_bench.distributed.schedule`).
The measurement loops see one :class:`~gpipe_bench.engines.base.Trainer` per
rank: rank 0 feeds the inputs and writes the record, the last rank holds the
labels, and the loops' barriers, maxima and gathers are the process group's.
The first step infers the stages' shapes, so it is run before any figure.

The process group outlives each trainer: a launch's rows run one after the
other in the same processes and share it (one per row would cost a rendezvous
and, on GPUs, new NCCL communicators each time). It is destroyed when the
process is done with it, at exit (:func:`leave_process_group`), so NCCL's
communicators are torn down while the interpreter is whole rather than by a
destructor that warns and may abort.
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import distributed_c10d

from gpipe_bench import models, precision
from gpipe_bench.distributed.schedule import make_schedule, step
from gpipe_bench.distributed.stages import build_local
from gpipe_bench.errors import HarnessError
from gpipe_bench.jobs import Job

from .base import MemoryWatch, Trainer

__all__ = ["DistributedTrainer", "join_process_group", "leave_process_group", "rank_device"]


@dataclass
class _Ownership:
    """What this process knows of its default group: whether it was made here, and whether it may be broken."""

    #: Made by :func:`join_process_group`: destroyed here too (a group made by someone else is theirs to destroy).
    made: bool = False
    #: A step or a collective raised: a peer may still be blocked in it, and this rank may have work queued.
    failed: bool = False
    #: :func:`leave_process_group` is registered to run at exit (once per process).
    registered: bool = False


_GROUP = _Ownership()


def join_process_group(device: torch.device, timeout_s: float) -> None:
    """Make this process's default group (NCCL on a GPU, gloo on a CPU) unless one exists; it is left at exit."""
    if dist.is_initialized():
        return
    # NCCL: bind the group to this rank's GPU (collectives on device tensors, no guessing).
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    _GROUP.made, _GROUP.failed = True, False
    if not _GROUP.registered:
        atexit.register(leave_process_group)
        _GROUP.registered = True


def leave_process_group() -> None:
    """Destroy the default group if :func:`join_process_group` made it; a no-op otherwise, and when called again.

    After a failure the group is aborted instead: a destroy first flushes this
    rank's queued collectives, which wait for peers that may never come (the
    failing rank would hang on its way out, and the launch would wait for it).
    An abort drops them; one that fails is not reported over the error that
    ended the run.
    """
    if not _GROUP.made:
        return
    _GROUP.made = False
    if not dist.is_initialized():
        return
    if not _GROUP.failed:
        # Every rank reaches its exit before any tears its connections down: a rank that destroyed its
        # gloo pairs while a peer's threads still read from them took that peer down with a C++
        # terminate (SIGABRT after its record was written), now and then on a loaded host.
        try:
            dist.barrier()
        except (RuntimeError, ValueError):
            _GROUP.failed = True
        else:
            dist.destroy_process_group()
            return
    # torch's abort is not public API: without it the group is left to its destructor, as before.
    abort = getattr(distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None:
            abort()
    except (RuntimeError, ValueError):
        pass  # the process is ending on an error already: that one is the one to report


@contextmanager
def _collective() -> Iterator[None]:
    """Mark the group broken when the block (a step or a collective) raises, Ctrl-C included."""
    try:
        yield
    except BaseException:
        _GROUP.failed = True
        raise


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


def _loss(out: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy in fp32 whatever the last stage's output dtype, as autocast computes it."""
    return F.cross_entropy(out.float(), target)


class DistributedTrainer(Trainer):
    """This rank's stages of the row under the job's schedule."""

    warm_up_steps = 1

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.device = rank_device()
        join_process_group(self.device, job.timeout_s)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.precision = job.row.precision
        self.reporter = self.rank == 0
        name, args = job.model_name, job.model_args
        self.balance = list(job.row.balance) if job.row.balance else [models.count(name, **args)[0]]
        self.stages = build_local(name, self.balance, self.rank, self.size, job.schedule, self.device, seed=0, **args)
        for stage in self.stages.values():
            stage.train()
        # The schedule runs forwards and backwards in one call: each stage's forward takes the precision itself.
        run = {
            s: precision.Autocast(stage, self.precision, self.device.type)
            if precision.autocast_dtype(self.precision)
            else stage
            for s, stage in self.stages.items()
        }
        self.pipe = make_schedule(
            run,
            self.rank,
            self.size,
            self.device,
            job.row.chunks,
            job.schedule,
            _loss,
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
        with _collective(), precision.whole_step(self.precision):
            step(self.pipe, self.rank, self.size, x, y)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        with _collective():
            dist.barrier()

    def slowest(self, seconds: float) -> float:
        # On the rank's device: an NCCL group has no CPU backend.
        elapsed = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        with _collective():
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            return float(elapsed.item())

    def gather(self, value: Any) -> List[Any]:
        out: List[Any] = [None] * self.size
        with _collective():
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
