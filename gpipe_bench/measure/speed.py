"""Speed: training throughput of one table row, by the published method, on any engine.

One fixed synthetic batch (``rand(B, 3, S, S)`` where the first partition is,
labels ``randint`` where the last is) is reused every step; an epoch is
``dataset_size // B`` steps; the first ``skip_epochs`` epochs are warm-up; the
figure is the mean of the per-epoch throughputs of the rest, every device
synchronised at each epoch's end (across processes: the slowest rank's time,
what the whole pipeline sustained). The per-epoch figures are kept, so the
spread is reported, not only the mean.

A timeline of one step (``--timeline``) is recorded after the warm-up, as an
extra step outside every timed epoch: a figure is never measured with the
recorder attached. Only this process's engine can be recorded: our GPipe
through its hook, and the plain model (a row that does not split it)
through module hooks; :func:`check_timeline` says so before anything runs.
"""

from __future__ import annotations

import gc
import signal
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from gpipe_bench import engines, optim
from gpipe_bench.environment import environment, now
from gpipe_bench.errors import HarnessError
from gpipe_bench.jobs import Job
from gpipe_bench.results import Result, Status, summarize
from gpipe_bench.timeline.model import Timeline
from gpipe_bench.timeline.recorder import TimelineRecorder

__all__ = ["Progress", "Interrupted", "TimelineSink", "check_timeline", "run"]

# Called after every step: (epoch, step, steps per epoch, samples/s so far this epoch).
Progress = Callable[[int, int, int, float], None]
# Given the timeline of one recorded step (see run's ``timeline``).
TimelineSink = Callable[[Timeline], None]
# The caller's work in a step, marked by label ('zero_grad', 'optimizer'): a no-op unless recorded.
_Host = Callable[[str], AbstractContextManager[Any]]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM: ``signum``) during a row: how many epochs had finished (warm-up included) when it came."""

    def __init__(self, completed_epochs: int, signum: int = signal.SIGINT) -> None:
        super().__init__(completed_epochs)
        self.completed_epochs, self.signum = completed_epochs, signum


def check_timeline(engine: str, planned: Sequence[Job] = ()) -> None:
    """Raise :class:`HarnessError` unless every planned row of ``engine`` can record a timeline.

    Our engine's rows can (its hook), and so can a row that does not split
    the model, on any engine (the plain model). torchgpipe's pipeline and
    torch's pipelining over processes have no hook to record.
    """
    if engine == "distributed":
        raise HarnessError(
            "--timeline records this process's engine, and --engine distributed runs its stages in other processes; "
            "drop --timeline, or time the row with --engine gpipe-bench",
            param="--timeline",
        )
    for job in planned:
        if job.split and job.engine != "gpipe-bench":
            raise HarnessError(
                f"{job.row.name} on --engine {job.engine} cannot be recorded: only our engine has the hook; "
                "use --engine gpipe-bench (or a row that does not split the model, e.g. naive-1)",
                param="--timeline",
            )


def run(job: Job, progress: Optional[Progress] = None, timeline: Optional[TimelineSink] = None) -> Optional[Result]:
    """Train the row for ``epochs`` on the fixed batch; the Result (on the reporting process; None elsewhere).

    Out of memory in one process gives a Result with status ``"oom"``, not a
    crash (across processes the launch stops every rank instead). Ctrl-C
    raises :class:`Interrupted` with the number of epochs that finished.

    ``timeline``: given the :class:`~gpipe_bench.timeline.Timeline` of one
    extra step, recorded after the warm-up epochs (after the first epoch when
    there are none), before the first measured one (check the row first with
    :func:`check_timeline`).
    """
    if timeline is not None:
        check_timeline(job.engine, [job])
    s, row = job.settings, job.row
    steps = job.steps_per_epoch()
    throughputs: List[float] = []
    status: Status = "ok"
    completed = 0
    record_after = min(max(s.skip_epochs, 1), s.epochs)
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
            if timeline is not None and completed == record_after:
                timeline(_record_step(job, trainer, run_step))
        trainer.barrier()
    except KeyboardInterrupt as stop:
        raise Interrupted(completed, getattr(stop, "signum", signal.SIGINT)) from None
    except (RuntimeError, MemoryError) as error:
        if not engines.is_oom(error) or job.engine == "distributed":
            raise
        status, throughputs = "oom", []
    finally:
        _release(trainer)
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
        extra={**trainer.record_extra(), **trainer.scaling_record()} if trainer is not None else {},
        created=now(),
    )


def _release(trainer: Optional[engines.Trainer]) -> None:
    """Free what the row held before the next row starts.

    An out-of-memory row leaves its activations in reference cycles (the
    error's traceback, the frames of the engine's workers) that only a
    collection frees; without one they would still hold memory when the next
    row builds its model and push it out too. Collected first, then CUDA's
    cache is emptied, so the freed blocks go back to the device.
    """
    if trainer is not None:
        trainer.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _untimed(label: str) -> AbstractContextManager[Any]:
    return nullcontext()


def _stepper(trainer: engines.Trainer, optimizer: torch.optim.Optimizer) -> Callable[..., None]:
    """One training step on the row's fixed batch: zero the gradients, forward and backward, optimizer step.

    ``host`` marks the caller's own work when the step is recorded.
    """
    x, y = trainer.batch()

    def run_step(host: _Host = _untimed) -> None:
        with host("zero_grad"):
            optimizer.zero_grad()
        trainer.step(x, y)
        with host("optimizer"):
            trainer.optimizer_step(optimizer)

    return run_step


def _record_step(job: Job, trainer: engines.Trainer, run_step: Callable[..., None]) -> Timeline:
    """One more training step, recorded: the pipeline's cells through the engine's hook, or the plain model's."""
    row = job.row
    devices = list(job.devices) if job.split else list(job.devices[:1])
    recorder = TimelineRecorder(devices)
    trainer.synchronize()
    with trainer.recording(recorder), recorder.recording():
        run_step(recorder.host)
    if job.split:
        how = f"{len(devices)} partitions, {row.chunks} micro-batches, checkpoint {row.checkpoint}"
    else:
        how = "the plain model"
    meta: Dict[str, object] = {
        "table": job.table.name,
        "row": row.name,
        "profile": job.profile,
        "engine": job.record_engine,
        "model": job.model_name,
        "batch": row.batch,
        "chunks": row.chunks if job.split else 1,
        "checkpoint": row.checkpoint if job.split else "never",
        "balance": list(trainer.balance) if job.split else None,
        "devices": devices,
    }
    return recorder.timeline(f"{job.model_name} {row.name}: batch {row.batch}, {how}", meta)
