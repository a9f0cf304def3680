"""The one interface between the measurements and the engines that run a row.

Why: speed, memory and accuracy each need the same few things from whatever
runs the model (our GPipe, torchgpipe 0.0.7, the plain model, torch's
pipelining over processes): build the row's partitions or stages, feed a
batch, run a training step, wait for the devices, and watch memory. With
those behind :class:`Trainer`, each measurement is one loop written once
(:mod:`gpipe_bench.measure`), and each engine is written once.

Processes: a distributed trainer is this process's part of the row. The
loops call :meth:`Trainer.barrier`, :meth:`Trainer.slowest` and
:meth:`Trainer.gather` where ranks must agree; for an engine in one process
these are no-ops. Only the trainer whose :attr:`~Trainer.reporter` is true
(rank 0) writes the record.
"""

from __future__ import annotations

import gc
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from gpipe_bench import precision
from gpipe_bench.errors import HarnessError
from gpipe_bench.jobs import Job
from gpipe_bench.memory.tracker import TensorMemory

if TYPE_CHECKING:
    from gpipe_bench.timeline.recorder import TimelineRecorder

__all__ = ["Trainer", "MemoryWatch", "is_oom", "place"]


def place(device: str) -> torch.device:
    """Where a device's tensors live: virtual CPU devices are host memory."""
    return torch.device("cpu") if device.startswith("cpu") else torch.device(device)


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: CUDA's out of memory, or the host allocator's refusal."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


@dataclass
class MemoryWatch:
    """Peak activation bytes per memory slot of this process, filled in when the watch ends.

    ``peaks``: the published method's figure (CUDA: peak reserved; CPU: the meter's).
    ``allocated``: on CUDA, the peak allocated by tensors, model memory taken off too:
    the reserved peak grows in the allocator's 2 and 20 MiB segments and holds cuDNN's
    workspaces, so the predictor (tensors only) is compared with this one. Empty on a CPU,
    whose meter has one figure.
    """

    meter: Optional[TensorMemory]
    peaks: List[int]
    allocated: List[int] = field(default_factory=list)

    def exclude(self, tensors: Sequence[Optional[Tensor]]) -> None:
        """Leave model state (gradients, optimizer buffers) out of the figures (the CPU meter; CUDA subtracts it)."""
        if self.meter is not None:
            self.meter.exclude(tensors)

    @contextmanager
    def charge(self, slot: int) -> Iterator[None]:
        """Count what this thread allocates in the block on ``slot`` (the CPU meter)."""
        if self.meter is None:
            yield
        else:
            with self.meter.charge(slot):
                yield


class Trainer(ABC):
    """A row's model as an engine built it in this process: what the measurement loops drive."""

    #: Whether this process writes the record (rank 0 of a launch; always in one process).
    reporter: bool = True
    #: Steps to run before any figure: torch's pipelining infers shapes in its first step.
    warm_up_steps: int = 0
    #: Layers per partition (or stage) as built: the row's, or the one found for it.
    balance: List[int]

    def __init__(self, job: Job) -> None:
        self.job = job
        #: fp16's loss scale (a no-op in every other precision): the step scales, the optimizer step unscales
        self.loss_scale = precision.LossScale(job.row.precision, job.device_type)

    # -- what the loops drive -------------------------------------------------------------------------------------

    @abstractmethod
    def parameters(self) -> List[nn.Parameter]:
        """This process's parameters (for the optimizer)."""

    @abstractmethod
    def batch(self, watch: Optional["MemoryWatch"] = None) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The row's fixed synthetic mini-batch: inputs where the first partition is, labels where the last is.

        Under a memory ``watch`` the inputs count on the first slot (where they live).
        """

    @abstractmethod
    def step(self, x: Optional[Tensor], y: Optional[Tensor]) -> None:
        """Forward, cross-entropy and backward of one mini-batch (no optimizer step), in the row's precision."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's step; under fp16 unscaled first, and skipped (counted) when a gradient overflowed."""
        self.loss_scale.step(optimizer)

    def synchronize(self) -> None:
        """Wait until every device of this process has finished the work queued so far."""
        for device in sorted({str(place(d)) for d in self.memory_devices() if d.startswith("cuda")}):
            torch.cuda.synchronize(device)

    def barrier(self) -> None:
        """Wait for the other processes of the row (none here)."""

    def slowest(self, seconds: float) -> float:
        """The longest of every process's ``seconds``: what the whole pipeline sustained."""
        return seconds

    def gather(self, value: Any) -> List[Any]:
        """``value`` of every process, in rank order (one here)."""
        return [value]

    def close(self) -> None:
        """Release the model and cached device memory."""

    def recording(self, recorder: "TimelineRecorder") -> AbstractContextManager[None]:
        """What ``recorder`` needs around one step beyond the engine's hook (entered by the speed loop).

        Only an engine in this process can be recorded; the speed command checks
        the row first (:func:`gpipe_bench.measure.speed.check_timeline`), so this is a guard.
        """
        raise HarnessError(f"{type(self).__name__} cannot record a timeline of its step", param="--timeline")

    # -- memory ---------------------------------------------------------------------------------------------------

    @abstractmethod
    def memory_devices(self) -> List[str]:
        """The devices whose memory this process's figures are per, in order (partitions sharing one count once)."""

    @abstractmethod
    def memory_parts(self) -> List[Tuple[int, nn.Module]]:
        """(memory slot, module) of each partition or stage of this process: its model memory is counted there."""

    def model_bytes(self, copies: int) -> List[int]:
        """Model memory per slot: ``copies`` x the parameters' bytes (weights, gradients, optimizer buffers)."""
        out = [0] * len(self.memory_devices())
        for slot, module in self.memory_parts():
            out[slot] += copies * sum(p.numel() * p.element_size() for p in module.parameters())
        return out

    def meter_owner(self) -> int:
        """The slot the CPU meter charges to the calling thread (loss, joined output, optimizer)."""
        return len(self.memory_devices()) - 1

    @contextmanager
    def watch_memory(self, copies: int) -> Iterator[MemoryWatch]:
        """Peak activation memory per slot over the block.

        CUDA: the allocator's peak reserved memory of each device minus its
        model memory (the published method), after emptying what an earlier
        row left; its peak allocated memory minus model memory beside it
        (:attr:`MemoryWatch.allocated`). CPU: the bytes held by tensors (the
        memory meter), model state excluded by the caller through
        :meth:`MemoryWatch.exclude`.
        """
        devices = self.memory_devices()
        if any(d.startswith("cuda") for d in devices):
            gc.collect()
            for d in devices:
                torch.cuda.synchronize(d)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(d)
            watch = MemoryWatch(None, [])
            yield watch
            held = self.model_bytes(copies)
            for d, model in zip(devices, held):
                torch.cuda.synchronize(d)
                watch.peaks.append(torch.cuda.max_memory_reserved(d) - model)
                watch.allocated.append(torch.cuda.max_memory_allocated(d) - model)
            return
        meter = TensorMemory(default_owner=self.meter_owner())
        watch = MemoryWatch(meter, [])
        # The meter sees the engine's workers through the engine's public hook, each charged its device.
        with meter.metering({d: slot for slot, d in enumerate(devices)}):
            yield watch
        curves = meter.curves()
        watch.peaks.extend(curves[k].peak if k in curves else 0 for k in range(len(devices)))

    # -- the record -----------------------------------------------------------------------------------------------

    def record_settings(self) -> Dict[str, Any]:
        """What this engine adds to the record's settings (devices as run, balance, schedule...)."""
        return {}

    def record_extra(self) -> Dict[str, Any]:
        """What this engine adds to the record's ``extra``."""
        return {}

    def scaling_record(self) -> Dict[str, Any]:
        """fp16: the optimizer steps taken, those skipped on overflow, and the final loss scale (else nothing)."""
        return self.loss_scale.record()

    def environment_devices(self) -> List[str]:
        """The devices the record's environment names."""
        return list(self.job.devices)
