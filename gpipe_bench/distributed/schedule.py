"""One rank's stages under a ``torch.distributed.pipelining`` schedule: build them, run training steps.

The first rank feeds the mini-batch, the last the target; the schedule splits
both into the row's micro-batches. ``scale_grads`` divides by the number of
micro-batches, so a step is the plain model's step on the mean loss, with
gradients accumulated over the same micro-batches (tests/distributed).

GPipe and 1F1B run one stage per rank. Interleaved 1F1B runs several: the
row's stages are dealt round-robin (stage ``s`` on rank ``s % world``), so a
row of 8 stages runs interleaved on 4 processes with 2 stages each, or on 2
with 4. The first stage is always on rank 0 and the last on the last rank.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["SCHEDULES", "default_processes", "local_stages", "check", "make_schedule", "step"]

#: Names users give (``--schedule``) -> torch's schedule classes.
SCHEDULES: Dict[str, str] = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}


def default_processes(schedule: str, stages: int) -> int:
    """How many processes a row of ``stages`` stages runs on when none are named: one per stage, two stages each interleaved."""
    return max(1, stages // 2) if schedule == "interleaved" else stages


def local_stages(stages: int, rank: int, world: int, schedule: str) -> List[int]:
    """The stage indices rank ``rank`` holds: its own under GPipe/1F1B, every ``world``-th when interleaved."""
    return list(range(rank, stages, world)) if schedule == "interleaved" else [rank]


def check(schedule: str, stages: int, world: int, chunks: int) -> Optional[str]:
    """Why ``schedule`` cannot run ``stages`` stages with ``chunks`` micro-batches on ``world`` processes, or None."""
    if schedule not in SCHEDULES:
        return f"unknown schedule {schedule!r}; use one of: {', '.join(SCHEDULES)}"
    if schedule == "interleaved":
        if stages % world or stages // world < 2:
            return (
                f"interleaved needs at least two stages per process and the same number on each "
                f"({stages} stage(s) on {world} process(es)); launch with --nproc {default_processes(schedule, stages)}"
                + (" or fewer dividing it" if stages >= 4 else "")
            )
        rounds = max(1, chunks // world)
        if chunks % rounds:
            return (
                f"interleaved needs micro-batches in whole rounds of about {world}: {chunks} is not a multiple "
                f"of {rounds}; use --chunks {rounds * world} or {world}"
            )
        return None
    if stages != world:
        return f"{stages} stage(s) but {world} process(es) were launched; launch with --nproc {stages}"
    if schedule == "1f1b" and chunks < world:
        return f"1f1b needs at least as many micro-batches as stages (chunks {chunks}, stages {world})"
    return None


def make_schedule(
    stage_modules: Union[nn.Module, Mapping[int, nn.Module]],
    rank: int,
    world: int,
    device: torch.device,
    chunks: int,
    schedule: str,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    group: Optional[dist.ProcessGroup] = None,
    stages: Optional[int] = None,
) -> Any:
    """The pipelining stages of ``rank`` and their schedule over ``chunks`` micro-batches.

    ``stage_modules`` is this rank's one stage, or ``{stage index: module}``
    for its stages (interleaved); ``stages`` is the total (default ``world``).
    """
    from torch.distributed import pipelining

    modules = dict(stage_modules) if isinstance(stage_modules, Mapping) else {rank: stage_modules}
    total = stages if stages is not None else world
    problem = check(schedule, total, world, chunks)
    if problem is not None:
        raise ValueError(problem)
    expected = local_stages(total, rank, world, schedule)
    if sorted(modules) != expected:
        raise ValueError(f"rank {rank} holds stages {expected} under {schedule}, not {sorted(modules)}")
    built = [pipelining.PipelineStage(modules[s], s, total, device, group=group) for s in expected]
    cls = getattr(pipelining, SCHEDULES[schedule])
    if schedule == "interleaved":
        return cls(built, n_microbatches=chunks, loss_fn=loss_fn, scale_grads=True)
    return cls(built[0], n_microbatches=chunks, loss_fn=loss_fn, scale_grads=True)


def step(schedule: Any, rank: int, world: int, x: Optional[Tensor], y: Optional[Tensor]) -> List[Tensor]:
    """One training step's forward and backward (no optimizer step); the micro-batch losses on the last rank."""
    losses: List[Tensor] = []
    if world == 1:
        schedule.step(x, target=y, losses=losses)
    elif rank == 0:
        schedule.step(x)
    elif rank == world - 1:
        schedule.step(target=y, losses=losses)
    else:
        schedule.step()
    return losses
