"""Speed: training throughput of one table row, by the published method.

One fixed synthetic batch (``rand(B, 3, S, S)`` on the first device, labels
``randint`` on the last) is reused every step; an epoch is
``dataset_size // B`` steps; the first ``skip_epochs`` epochs are warm-up; the
figure is the mean of the per-epoch throughputs of the rest, every device
synchronised at each epoch's end. The per-epoch figures are kept, so the
spread is reported, not only the mean.
"""
from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gpipe_bench import models
from gpipe_bench.config import Row, Settings, Table
from gpipe_bench.errors import HarnessError
from gpipe_bench.pipe import GPipe
from gpipe_bench.environment import environment
from gpipe_bench.results import Result

__all__ = ["SpeedJob", "Progress", "model_name", "model_args", "build", "run"]

# Called after every step: (epoch, step, steps per epoch, samples/s so far this epoch).
Progress = Callable[[int, int, int, float], None]


@dataclass(frozen=True)
class SpeedJob:
    """Everything one measurement needs, resolved: no defaults are looked up later."""

    table: Table
    row: Row
    settings: Settings
    profile: str
    devices: Sequence[str]
    engine: str = "gpipe-bench"  # or "torchgpipe", the archived peer on the same settings


def model_name(job: SpeedJob) -> str:
    """The registered model the job's profile trains (a profile may name a smaller one of the family)."""
    return job.table.profile(job.profile).model or job.table.model


def model_args(job: SpeedJob) -> Dict[str, Any]:
    profile = job.table.profile(job.profile)
    return {**job.table.model_args, **profile.model_args, **job.row.model_args, "num_classes": job.settings.classes}


def _place(device: str) -> torch.device:
    return torch.device("cpu") if device.startswith("cpu") else torch.device(device)


def build(job: SpeedJob) -> nn.Module:
    """The plain model on one device, or the model split by the row's balance under the chosen engine."""
    if job.engine == "torchgpipe" and importlib.util.find_spec("torchgpipe") is None:
        raise HarnessError(
            "--engine torchgpipe: torchgpipe is not installed; install it with: pip install -e '.[peers]'"
        )
    extra: Dict[str, Any] = {}
    skip_arg = models.spec(model_name(job)).skip_api_arg
    if job.engine == "torchgpipe" and skip_arg is not None:
        extra[skip_arg] = "torchgpipe.skip"
    model = models.build(model_name(job), **model_args(job), **extra)
    row = job.row
    if row.balance is None:
        return model.to(_place(job.devices[0]))
    kwargs: Dict[str, Any] = dict(devices=list(job.devices), chunks=row.chunks, checkpoint=row.checkpoint)
    if job.engine == "torchgpipe":
        import torchgpipe

        return torchgpipe.GPipe(model, list(row.balance), **kwargs)
    return GPipe(model, list(row.balance), **kwargs)


def _synchronize(devices: Sequence[str]) -> None:
    for device in sorted({d for d in devices if d.startswith("cuda")}):
        torch.cuda.synchronize(device)


def settings_record(job: SpeedJob) -> Dict[str, Any]:
    row, s = job.row, job.settings
    return {
        "model": model_name(job), "model_args": model_args(job), "mode": row.mode, "devices": list(job.devices),
        "batch": row.batch, "chunks": row.chunks, "balance": list(row.balance) if row.balance else None,
        "checkpoint": row.checkpoint, "input_size": s.input_size, "dataset_size": s.dataset_size,
        "epochs": s.epochs, "skip_epochs": s.skip_epochs, "optimizer": dict(s.optimizer), "classes": s.classes,
    }


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run(job: SpeedJob, progress: Optional[Progress] = None) -> Result:
    """Train the row's model for ``epochs`` on the fixed batch; a Result with the per-epoch throughputs.

    Out of memory on a device gives a Result with status ``"oom"``, not a crash.
    KeyboardInterrupt propagates, with ``completed_epochs`` attached to it.
    """
    s, row = job.settings, job.row
    steps = s.dataset_size // row.batch
    if steps < 1:
        raise HarnessError(
            f"dataset_size {s.dataset_size} is smaller than the batch {row.batch}: no full step per epoch; "
            "raise dataset_size or lower --batch-size"
        )
    throughputs: List[float] = []
    status = "ok"
    model: Optional[nn.Module] = None
    try:
        torch.manual_seed(0)
        model = build(job)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=float(s.optimizer.get("lr", 0.1)))
        x = torch.rand(row.batch, 3, s.input_size, s.input_size, device=_place(job.devices[0]))
        y = torch.randint(0, s.classes, (row.batch,), device=_place(job.devices[-1]))
        for epoch in range(s.epochs):
            _synchronize(job.devices)
            start = time.perf_counter()
            for step in range(steps):
                optimizer.zero_grad()
                output = model(x)
                torch.autograd.backward(F.cross_entropy(output, y))
                optimizer.step()
                if progress is not None:
                    progress(epoch, step + 1, steps, (step + 1) * row.batch / (time.perf_counter() - start))
            _synchronize(job.devices)
            elapsed = time.perf_counter() - start
            if epoch >= s.skip_epochs:
                throughputs.append(steps * row.batch / elapsed)
    except KeyboardInterrupt as interrupt:
        interrupt.completed_epochs = len(throughputs) + min(s.skip_epochs, s.epochs)  # type: ignore[attr-defined]
        raise
    except RuntimeError as error:
        if not _is_oom(error):
            raise
        status, throughputs = "oom", []
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    value = statistics.fmean(throughputs) if throughputs else None
    spread: Dict[str, float] = {}
    if throughputs:
        spread = {
            "min": min(throughputs), "max": max(throughputs), "median": statistics.median(throughputs),
            "std": statistics.stdev(throughputs) if len(throughputs) > 1 else 0.0,
        }
    return Result(
        table=job.table.name, experiment=row.name, profile=job.profile, engine=job.engine, kind="speed",
        metric=job.table.metric, unit=job.table.unit, value=value, status=status, samples=throughputs,
        spread=spread, settings=settings_record(job), environment=environment(list(job.devices)), extra={},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
