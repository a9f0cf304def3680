"""Speed: training throughput of one table row, by the published method, on any engine.

One fixed synthetic batch (``rand(B, 3, S, S)`` where the first partition is,
labels ``randint`` where the last is) is reused every step; an epoch is
``dataset_size // B`` steps; the first ``skip_epochs`` epochs are warm-up; the
figure is the mean of the per-epoch throughputs of the rest, every device
synchronised at each epoch's end (across processes: the slowest rank's time,
what the whole pipeline sustained). The per-epoch figures are kept, so the
spread is reported, not only the mean.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional

import torch

from gpipe_bench import engines, optim
from gpipe_bench.environment import environment, now
from gpipe_bench.jobs import Job
from gpipe_bench.results import Result, Status, summarize

__all__ = ["Progress", "Interrupted", "run"]

# Called after every step: (epoch, step, steps per epoch, samples/s so far this epoch).
Progress = Callable[[int, int, int, float], None]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a row: how many epochs had finished (warm-up included) when it came."""

    def __init__(self, completed_epochs: int) -> None:
        super().__init__(completed_epochs)
        self.completed_epochs = completed_epochs


def run(job: Job, progress: Optional[Progress] = None) -> Optional[Result]:
    """Train the row for ``epochs`` on the fixed batch; the Result (on the reporting process; None elsewhere).

    Out of memory in one process gives a Result with status ``"oom"``, not a
    crash (across processes the launch stops every rank instead). Ctrl-C
    raises :class:`Interrupted` with the number of epochs that finished.
    """
    s, row = job.settings, job.row
    steps = job.steps_per_epoch()
    throughputs: List[float] = []
    status: Status = "ok"
    completed = 0
    trainer: Optional[engines.Trainer] = None
    try:
        trainer = engines.build(job)
        run_step = _stepper(trainer, optim.build(s.optimizer, trainer.parameters()))
        for _ in range(trainer.warm_up_steps):
            run_step()  # e.g. shape inference: kept out of the figures
        for epoch in range(s.epochs):
            trainer.barrier()
            trainer.synchronize()
            start = time.perf_counter()
            for k in range(steps):
                run_step()
                if progress is not None and trainer.reporter:
                    progress(epoch, k + 1, steps, (k + 1) * row.batch / (time.perf_counter() - start))
            trainer.synchronize()
            elapsed = trainer.slowest(time.perf_counter() - start)
            completed += 1
            if epoch >= s.skip_epochs:
                throughputs.append(steps * row.batch / elapsed)
        trainer.barrier()
    except KeyboardInterrupt:
        raise Interrupted(completed) from None
    except (RuntimeError, MemoryError) as error:
        if not engines.is_oom(error) or job.engine == "distributed":
            raise
        status, throughputs = "oom", []
    finally:
        if trainer is not None:
            trainer.close()
        elif torch.cuda.is_available():
            torch.cuda.empty_cache()
    if trainer is not None and not trainer.reporter:
        return None
    settings = job.settings_record()
    settings.update(trainer.record_settings() if trainer is not None else {})
    devices = trainer.environment_devices() if trainer is not None else list(job.devices)
    return Result(
        table=job.table.name,
        experiment=row.name,
        profile=job.profile,
        engine=job.record_engine,
        kind="speed",
        metric=job.table.metric,
        unit=job.table.unit,
        value=statistics.fmean(throughputs) if throughputs else None,
        status=status,
        samples=throughputs,
        spread=summarize(throughputs),
        settings=settings,
        environment=environment(devices),
        extra=trainer.record_extra() if trainer is not None else {},
        created=now(),
    )


def _stepper(trainer: engines.Trainer, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """One training step on the row's fixed batch: zero the gradients, forward and backward, optimizer step."""
    x, y = trainer.batch()

    def run_step() -> None:
        optimizer.zero_grad()
        trainer.step(x, y)
        optimizer.step()

    return run_step
