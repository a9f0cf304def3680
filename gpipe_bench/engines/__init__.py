"""Engines behind one interface: :class:`Trainer` (see :mod:`.base`), built by :func:`build` for a job.

- ``gpipe-bench``: our engine (:mod:`gpipe_bench.pipe`), in this process (:mod:`.local`);
- ``torchgpipe``: torchgpipe 0.0.7 on the same settings, in this process (:mod:`.local`);
- the plain model, for rows that do not split it, whichever engine was asked for (:mod:`.local`);
- ``distributed``: torch.distributed.pipelining, this rank's stages under torchrun (:mod:`.distributed`).
"""

from __future__ import annotations

from typing import Optional, Sequence

from gpipe_bench.jobs import Job

from .base import MemoryWatch, Trainer, is_oom, place

__all__ = ["Trainer", "MemoryWatch", "build", "is_oom", "place"]


def build(job: Job, balance: Optional[Sequence[int]] = None) -> Trainer:
    """The trainer of ``job``'s engine; ``balance`` when the row's is found elsewhere (memory rows)."""
    if job.engine == "distributed":
        from .distributed import DistributedTrainer  # torch.distributed only where used

        return DistributedTrainer(job)
    from .local import LocalTrainer

    return LocalTrainer(job, balance)
