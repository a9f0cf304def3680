"""Memory: parameters, model memory, and peak activation memory (measured and predicted) of one row.

The published columns, per row:

- Parameters: counted on ``meta`` (no memory; seconds for two billion).
- Total Model Parameter Memory: parameters × bytes × copies (weights,
  gradients, one optimizer buffer) in GiB, the published rule.
- Total Peak Activation Memory: per device, the peak during ``steps``
  training steps minus that device's model memory, summed over devices
  (over ranks, for torch's pipelining). On CUDA the peak is the allocator's
  peak *reserved* memory (the published method). On CPU it is the peak of
  bytes held by tensors, from :class:`~gpipe_bench.memory.tracker.TensorMemory`,
  with gradients and optimizer buffers left out instead of subtracted (they
  are model memory). See :meth:`gpipe_bench.engines.Trainer.watch_memory`.

Beside the measurement of an engine in this process, the prediction of
:mod:`gpipe_bench.memory.predict` for the same row, from ``meta`` alone;
``predict_only`` skips the measurement, so rows too big for this machine
still get their columns.

On CUDA the record also keeps the peak *allocated* memory minus model memory
per device. The reserved peak grows in the caching allocator's 2 and 20 MiB
segments and holds cuDNN's workspaces, neither of which the predictor (bytes
held by tensors) models: the prediction is compared with the allocated peak
there (``predicted_over_measured``), and with the meter's one figure on a CPU.
The table's measured column stays the published method's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from gpipe_bench import engines, models, optim
from gpipe_bench.devices import available_host_bytes, memory_slots
from gpipe_bench.environment import environment, now
from gpipe_bench.jobs import Job
from gpipe_bench.memory.allocator import AllocatorSettings
from gpipe_bench.memory.predict import Prediction, find_balance, predict_job
from gpipe_bench.perf import split
from gpipe_bench.results import Result, Status

__all__ = [
    "GIB",
    "METHODS",
    "COMPARED_WITH",
    "Peaks",
    "compared",
    "measure",
    "run",
]

GIB = float(2**30)

#: How a measured figure was taken, by where: one wording each, so a table's footnote names each method once.
METHODS = {
    "cuda": "CUDA max_memory_reserved minus model memory",
    "cpu": "bytes held by tensors (TensorMemory), model state excluded",
}

#: What the prediction is compared with, by where (``predicted_over_measured``): what tensors held.
COMPARED_WITH = {
    "cuda": "CUDA max_memory_allocated minus model memory",
    "cpu": METHODS["cpu"],
}


@dataclass(frozen=True)
class Peaks:
    """Peak activation bytes per memory slot of this process (model memory left out).

    ``reported``: the published method's figure (CUDA: peak reserved; CPU: the meter's).
    ``allocated``: CUDA's peak allocated by tensors; empty on a CPU.
    """

    reported: List[int]
    allocated: List[int] = field(default_factory=list)


def compared(predicted: int, reported: Sequence[int], allocated: Sequence[int]) -> Optional[float]:
    """Predicted / measured activation memory, summed over devices; None when nothing was measured.

    Against the allocated peak where there is one (CUDA): the predictor counts what
    tensors hold, not the allocator's segments or cuDNN's workspaces. Otherwise
    against the reported figure (the CPU meter's, which counts the same as the predictor).
    """
    measured = sum(allocated) if allocated else sum(reported)
    return predicted / measured if measured > 0 else None


def _model_memory(modules: Sequence[Tuple[int, nn.Module]], slots: int, width: int, copies: int) -> List[int]:
    """The published rule per slot: parameters x ``width`` bytes x ``copies``."""
    out = [0] * slots
    for slot, module in modules:
        out[slot] += sum(p.numel() for p in module.parameters()) * width * copies
    return out


def _comparison(
    prediction: Optional[Prediction], measured: List[int], allocated: List[int], where: str
) -> Dict[str, Any]:
    """The record's allocated peak (CUDA) and the prediction against the measurement, by :func:`compared`."""
    out: Dict[str, Any] = {}
    if allocated:
        out.update(allocated_gib=sum(allocated) / GIB, allocated_per_device_gib=[b / GIB for b in allocated])
    ratio = compared(prediction.total, measured, allocated) if prediction is not None else None
    if ratio is not None:
        out.update(predicted_over_measured=ratio, predicted_compared_with=COMPARED_WITH[where])
    return out


def _reserved_record(prediction: Prediction) -> Dict[str, Any]:
    """The caching allocator's predicted figures (CUDA rows), in GiB, total and per device; none elsewhere."""
    if prediction.reserved is None or prediction.allocated is None:
        return {}
    return {
        "predicted_reserved_gib": sum(prediction.reserved) / GIB,
        "predicted_allocated_gib": sum(prediction.allocated) / GIB,
        "predicted_reserved_per_device_gib": [b / GIB for b in prediction.reserved],
        "predicted_allocated_per_device_gib": [b / GIB for b in prediction.allocated],
        "predicted_allocator": prediction.allocator,
    }


def measure(trainer: engines.Trainer, job: Job) -> Peaks:
    """Peak activation bytes per memory slot of this process over the configured training steps."""
    optimizer = optim.build(job.settings.optimizer, trainer.parameters())
    own = job.memory_settings
    with trainer.watch_memory(copies=own.parameter_copies) as watch:
        x, y = trainer.batch(watch)
        for _ in range(own.steps):
            optimizer.zero_grad()
            trainer.step(x, y)
            trainer.optimizer_step(optimizer)
            watch.exclude(optim.model_state(trainer.parameters(), optimizer))
        del x, y
    return Peaks(list(watch.peaks), list(watch.allocated))


def run(job: Job, *, predict_only: bool = False, allocator: Optional[AllocatorSettings] = None) -> Optional[Result]:
    """The row's memory figures as a Result (value: measured total GiB; None when predicted only or OOM).

    ``allocator``: the caching allocator's settings for the prediction of what a CUDA row
    reserves (:mod:`gpipe_bench.memory.reserved`); None predicts held bytes only.

    On the reporting process (rank 0 of a launch); None elsewhere. On CPU a row
    whose prediction does not fit the host's available memory is not run (the
    process would be killed, not told): it is reported out of memory, with
    the figures that say why.
    """
    row = job.row
    meta = models.build_meta(
        job.model_name, **job.model_args
    )  # built once: counted, balanced, predicted and sized from the same modules
    layers, params = len(meta), sum(p.numel() for p in meta.parameters())
    own = job.memory_settings
    width, copies = own.bytes_per_parameter, own.parameter_copies
    balance = find_balance(job, meta)
    local = job.engine != "distributed"
    prediction = predict_job(job, balance, meta, allocator=allocator) if local else None
    devices = list(job.devices) if job.split else [job.devices[0]]
    distinct, slots = memory_slots(devices)
    parts = split(meta, balance) if job.split else [meta]
    model_bytes = _model_memory(list(zip(slots, parts)), len(distinct), width, copies)
    status: Status = "predicted"
    note = ""
    measured: Optional[List[int]] = None
    allocated: List[int] = []
    trainer: Optional[engines.Trainer] = None
    if not predict_only:
        status = "ok"
        available = available_host_bytes()
        needed = (prediction.total if prediction is not None else 0) + sum(model_bytes)
        on_cpu = not any(d.startswith("cuda") for d in distinct)
        if local and on_cpu and available is not None and needed > 0.9 * available:
            status = "oom"
            note = (
                f"not run: predicted to need {needed / GIB:.1f} GiB of host memory, {available / GIB:.1f} GiB available"
            )
        else:
            try:
                trainer = engines.build(job, balance)
                here = measure(trainer, job)
                mine = _model_memory(trainer.memory_parts(), len(here.reported), width, copies)
                gathered = trainer.gather((here, mine, trainer.memory_devices()))
                if not trainer.reporter:
                    return None
                measured = [p for peaks, _, _ in gathered for p in peaks.reported]
                allocated = [p for peaks, _, _ in gathered for p in peaks.allocated]
                if not local:  # per rank: its own model memory and device
                    model_bytes = [m for _, held, _ in gathered for m in held]
                    distinct = [f"rank {r}" for r in range(len(gathered))]
            except (RuntimeError, MemoryError) as error:
                if not engines.is_oom(error) or not local:
                    raise
                status, note = "oom", str(error).splitlines()[0][:200]
            finally:
                if trainer is not None:
                    trainer.close()
                elif torch.cuda.is_available():
                    torch.cuda.empty_cache()
    settings = job.settings_record()
    if trainer is not None:
        settings.update(trainer.record_settings())
    settings.update(balance=list(balance) if job.split else None, steps=own.steps)
    if local:
        settings["balance_found_by"] = None if row.balance is not None or not job.split else "balance_by_size"
    extra: Dict[str, Any] = {
        "layers": layers,
        "parameters": params,
        "model_memory_gib": params * width * copies / GIB,
        "model_memory_rule": f"parameters x {width} bytes x {copies} (weights, gradients, one optimizer buffer), GiB",
        "devices": distinct,
        "model_memory_per_device_gib": [b / GIB for b in model_bytes],
    }
    if prediction is not None:
        extra.update(
            predicted_gib=prediction.total / GIB,
            predicted_per_device_gib=[b / GIB for b in prediction.per_device],
            predicted_peak_at=prediction.when,
        )
        extra.update(_reserved_record(prediction))
    if measured is not None:
        cuda = trainer is not None and any(d.startswith("cuda") for d in trainer.memory_devices())
        extra["method"] = METHODS["cuda" if cuda else "cpu"]
        extra["measured_per_device_gib"] = [b / GIB for b in measured]
        extra.update(_comparison(prediction, measured, allocated, "cuda" if cuda else "cpu"))
        if prediction is not None and prediction.reserved is not None and cuda:
            extra["predicted_reserved_over_measured"] = compared(sum(prediction.reserved), measured, [])
            if prediction.allocated is not None and allocated:
                extra["predicted_allocated_over_measured"] = compared(sum(prediction.allocated), allocated, [])
    if note:
        extra["note"] = note
    if trainer is not None:
        extra.update(trainer.record_extra(), **trainer.scaling_record())
    # A prediction ran on this host only: it names no device it did not use.
    env_devices = (
        [] if predict_only else (trainer.environment_devices() if trainer is not None and not local else list(distinct))
    )
    return Result(
        table=job.table.name,
        experiment=row.name,
        profile=job.profile,
        engine=job.record_engine,
        kind="memory",
        metric=job.table.metric,
        unit=job.table.unit,
        value=sum(measured) / GIB if measured is not None else None,
        status=status,
        samples=[],
        spread={},
        settings=settings,
        environment=environment(env_devices),
        extra=extra,
        created=now(),
    )
