"""Memory: parameters, model memory, and peak activation memory (measured and predicted) of one row.

The published columns, per row:

- Parameters: counted on ``meta`` (no memory; seconds for two billion).
- Total Model Parameter Memory: parameters × bytes × copies (weights,
  gradients, one optimizer buffer) in GiB, the published rule.
- Total Peak Activation Memory: per device, the peak during ``steps``
  training steps minus that device's model memory, summed over devices.
  On CUDA the peak is the allocator's peak *reserved* memory (the published
  method). On CPU it is the peak of bytes held by tensors, from
  :class:`~gpipe_bench.memory.tracker.TensorMemory`, with gradients and
  optimizer buffers left out instead of subtracted (they are model memory).

Beside the measurement, the prediction of :mod:`gpipe_bench.memory.predict`
for the same row, from ``meta`` alone; ``predict_only`` skips the measurement,
so rows too big for this machine still get their columns.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpipe_bench import models
from gpipe_bench.config import Row, Settings, Table
from gpipe_bench.memory.predict import Prediction, nbytes, predict_pipeline, predict_plain
from gpipe_bench.perf import split
from gpipe_bench.memory.tracker import TensorMemory
from gpipe_bench.pipe import GPipe
from gpipe_bench.pipe.balance import balance_by_size
from gpipe_bench.pipe.microbatch import as_tuple
from gpipe_bench.environment import environment
from gpipe_bench.results import Result

from .speed import SpeedJob, _is_oom, _place, model_args, model_name, settings_record

__all__ = ["MemoryJob", "GIB", "find_balance", "predict", "measure", "run"]

GIB = float(2**30)

MemoryJob = SpeedJob  # the same resolved row, settings, profile and devices


def _extra(job: MemoryJob, key: str, default: Any) -> Any:
    return job.settings.extra.get(key, default)


def _meta_model(job: MemoryJob) -> nn.Sequential:
    with torch.device("meta"):
        return models.build(model_name(job), **model_args(job))


def _pipelined(row: Row) -> bool:
    return row.mode == "pipeline"


def find_balance(job: MemoryJob, model: Optional[nn.Sequential] = None) -> Tuple[int, ...]:
    """The row's balance, or one found by ``balance_by_size`` on ``meta`` when the config leaves it null.

    ``model``: the row's model on ``meta``, when the caller has built it already.
    """
    if job.row.balance is not None:
        return tuple(job.row.balance)
    model = model if model is not None else _meta_model(job)
    if not _pipelined(job.row) or job.row.devices == 1:
        return (len(model),)
    s = job.settings
    sample = torch.empty(job.row.batch, 3, s.input_size, s.input_size, device="meta")
    copies = float(_extra(job, "parameter_copies", 3))
    return tuple(balance_by_size(job.row.devices, model, sample, chunks=job.row.chunks, param_scale=copies, device="meta"))


def device_slots(devices: Sequence[str]) -> Tuple[List[str], List[int]]:
    """The distinct devices (in order of first use) and, per partition, the index of its device.

    Partitions on one device share its memory, so figures are per device, as the engine's workers are.
    """
    distinct: List[str] = []
    slots: List[int] = []
    for d in devices:
        key = "cuda:0" if d == "cuda" else d
        if key not in distinct:
            distinct.append(key)
        slots.append(distinct.index(key))
    return distinct, slots


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _optimizer_temp(part: nn.Module, device: str) -> int:
    """Scratch of an RMSprop step: one buffer per parameter tensor, all at once where PyTorch uses foreach (CUDA)."""
    sizes = [p.numel() * p.element_size() for p in part.parameters()]
    if not sizes:
        return 0
    return sum(sizes) if device.startswith("cuda") else max(sizes)


def predict(job: MemoryJob, balance: Sequence[int], model: Optional[nn.Sequential] = None) -> Prediction:
    """Peak activation bytes per device for the row, from ``meta`` (see :mod:`gpipe_bench.memory.predict`)."""
    row, s = job.row, job.settings
    model = model if model is not None else _meta_model(job)
    model.train()
    sample = torch.empty(row.batch, 3, s.input_size, s.input_size, device="meta")
    with torch.device("meta"):
        out = model(sample[:1])
    head = 2 * nbytes(as_tuple(out)[0]) * row.batch + row.batch * 8  # joined output, its gradient, the labels
    if not _pipelined(row):
        return predict_plain(model, sample, head_bytes=head, optimizer_temp=_optimizer_temp(model, job.devices[0]))
    parts = split(model, balance)
    devices = list(job.devices)
    _, slots = device_slots(devices)
    temps = [_optimizer_temp(p, d) for p, d in zip(parts, devices)]
    return predict_pipeline(model, balance, sample, chunks=row.chunks, checkpoint=row.checkpoint, slots=slots,
                            head_bytes=head, optimizer_temp=temps)


def _build(job: MemoryJob, balance: Sequence[int]) -> nn.Module:
    torch.manual_seed(0)
    model = models.build(model_name(job), **model_args(job))
    if not _pipelined(job.row):
        return model.to(_place(job.devices[0]))
    return GPipe(model, list(balance), devices=list(job.devices), chunks=job.row.chunks, checkpoint=job.row.checkpoint)


def _model_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[Tensor]:
    state = [p.grad for p in model.parameters() if p.grad is not None]
    for per_param in optimizer.state.values():
        state += [v for v in per_param.values() if isinstance(v, Tensor)]
    return state


def _train(job: MemoryJob, model: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
           meter: Optional[TensorMemory]) -> None:
    for _ in range(int(_extra(job, "steps", 2))):
        optimizer.zero_grad()
        torch.autograd.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        if meter is not None:
            meter.exclude(_model_state(model, optimizer))


def _optimizer(job: MemoryJob, model: nn.Module) -> torch.optim.Optimizer:
    spec = dict(job.settings.optimizer)
    name = str(spec.pop("name")).lower()
    lr = float(spec.pop("lr", 0.01))
    if name == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=lr, **spec)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, **spec)
    raise ValueError(f"optimizer {name!r} is not supported by the memory benchmark; use rmsprop or sgd")


def measure(job: MemoryJob, balance: Sequence[int]) -> List[int]:
    """Peak activation bytes per device (see :func:`device_slots`), measured over the configured training steps."""
    row, s = job.row, job.settings
    devices = list(job.devices) if _pipelined(row) else [job.devices[0]]
    distinct, slots = device_slots(devices)
    model = _build(job, balance)
    model.train()
    optimizer = _optimizer(job, model)
    first, last = _place(devices[0]), _place(devices[-1])
    if any(d.startswith("cuda") for d in distinct):
        # What an earlier row left (an out-of-memory row's tensors, cached blocks) must not count here.
        gc.collect()
        for d in distinct:
            torch.cuda.synchronize(d)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(d)
        x = torch.rand(row.batch, 3, s.input_size, s.input_size, device=first)
        y = torch.randint(0, s.classes, (row.batch,), device=last)
        _train(job, model, x, y, optimizer, None)
        copies = int(_extra(job, "parameter_copies", 3))
        parts = list(getattr(model, "partitions", [model]))
        model_bytes = [0] * len(distinct)
        for part, slot in zip(parts, slots):
            model_bytes[slot] += copies * _param_bytes(part)
        peaks = []
        for d, held in zip(distinct, model_bytes):
            torch.cuda.synchronize(d)
            peaks.append(torch.cuda.max_memory_reserved(d) - held)
        return peaks
    meter = TensorMemory(default_owner=slots[-1])  # the caller's thread: loss, joined output, optimizer
    with meter:
        with meter.charge(0):
            x = torch.rand(row.batch, 3, s.input_size, s.input_size, device=first)
        y = torch.randint(0, s.classes, (row.batch,), device=last)
        _train(job, model, x, y, optimizer, meter)
        del x, y
    curves = meter.curves()
    return [curves[k].peak if k in curves else 0 for k in range(len(distinct))]


def _available_host_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _model_bytes_per_device(job: MemoryJob, model: nn.Sequential, balance: Sequence[int], slots: Sequence[int],
                            count: int) -> List[int]:
    width = int(_extra(job, "bytes_per_parameter", 4))
    copies = int(_extra(job, "parameter_copies", 3))
    parts = split(model, balance) if _pipelined(job.row) else [model]
    out = [0] * count
    for part, slot in zip(parts, slots):
        out[slot] += sum(p.numel() for p in part.parameters()) * width * copies
    return out


def run(job: MemoryJob, *, predict_only: bool = False) -> Result:
    """The row's memory figures as a Result (value: measured total GiB; None when predicted only or OOM).

    On CPU a row whose prediction does not fit the host's available memory is
    not run (the process would be killed, not told): it is reported out of
    memory, with the figures that say why.
    """
    row = job.row
    meta = _meta_model(job)  # built once: counted, balanced, predicted and sized from the same modules
    layers, params = len(meta), sum(p.numel() for p in meta.parameters())
    width = int(_extra(job, "bytes_per_parameter", 4))
    copies = int(_extra(job, "parameter_copies", 3))
    balance = find_balance(job, meta)
    prediction = predict(job, balance, meta)
    devices = list(job.devices) if _pipelined(row) else [job.devices[0]]
    distinct, slots = device_slots(devices)
    model_bytes = _model_bytes_per_device(job, meta, balance, slots, len(distinct))
    status, measured, note = "predicted", None, ""
    if not predict_only:
        status = "ok"
        available = _available_host_bytes()
        needed = prediction.total + sum(model_bytes)
        on_cpu = not any(d.startswith("cuda") for d in distinct)
        if on_cpu and available is not None and needed > 0.9 * available:
            status = "oom"
            note = (f"not run: predicted to need {needed / GIB:.1f} GiB of host memory, "
                    f"{available / GIB:.1f} GiB available")
        else:
            try:
                measured = measure(job, balance)
            except RuntimeError as error:
                if not _is_oom(error):
                    raise
                status, note = "oom", str(error).splitlines()[0][:200]
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    settings = settings_record(job)
    settings.update(balance=list(balance) if _pipelined(row) else None, steps=int(_extra(job, "steps", 2)),
                    balance_found_by=None if row.balance is not None or not _pipelined(row) else "balance_by_size")
    extra: Dict[str, Any] = {
        "layers": layers,
        "parameters": params,
        "model_memory_gib": params * width * copies / GIB,
        "model_memory_rule": f"parameters x {width} bytes x {copies} (weights, gradients, one optimizer buffer), GiB",
        "devices": distinct,
        "model_memory_per_device_gib": [b / GIB for b in model_bytes],
        "predicted_gib": prediction.total / GIB,
        "predicted_per_device_gib": [b / GIB for b in prediction.per_device],
        "predicted_peak_at": prediction.when,
    }
    if measured is not None:
        extra["method"] = ("CUDA max_memory_reserved minus model memory" if any(d.startswith("cuda") for d in distinct)
                           else "bytes held by tensors (TensorMemory), model state excluded")
    if note:
        extra["note"] = note
    if measured is not None:
        extra["measured_per_device_gib"] = [b / GIB for b in measured]
    value = sum(measured) / GIB if measured is not None else None
    return Result(
        table=job.table.name, experiment=row.name, profile=job.profile, engine=job.engine, kind="memory",
        metric=job.table.metric, unit=job.table.unit, value=value, status=status,
        samples=[], spread={}, settings=settings,
        # A prediction ran on this host only: it names no device it did not use.
        environment=environment([] if predict_only else list(distinct)), extra=extra, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
