"""One rank's stage under a ``torch.distributed.pipelining`` schedule: build it, run training steps.

The first rank feeds the mini-batch, the last the target; the schedule splits
both into the row's micro-batches. ``scale_grads`` divides by the number of
micro-batches, so a step is the plain model's step on the mean loss, with
gradients accumulated over the same micro-batches (tests/distributed).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["SCHEDULES", "make_schedule", "step"]

#: Names users give (``--schedule``) -> torch's schedule classes.
SCHEDULES: Dict[str, str] = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}


def make_schedule(stage_module: nn.Module, rank: int, world: int, device: torch.device, chunks: int, schedule: str,
                  loss_fn: Callable[[Tensor, Tensor], Tensor], group: Optional[dist.ProcessGroup] = None) -> Any:
    """The pipelining stage of ``rank`` and its schedule over ``chunks`` micro-batches."""
    from torch.distributed import pipelining

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of: {', '.join(SCHEDULES)}")
    if schedule == "1f1b" and chunks < world:
        raise ValueError(f"1f1b needs at least as many micro-batches as stages (chunks {chunks}, stages {world})")
    stage = pipelining.PipelineStage(stage_module, rank, world, device, group=group)
    cls = getattr(pipelining, SCHEDULES[schedule])
    return cls(stage, n_microbatches=chunks, loss_fn=loss_fn, scale_grads=True)


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
