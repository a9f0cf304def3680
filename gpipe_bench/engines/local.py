"""Engines in this process: the plain model, our GPipe, and torchgpipe 0.0.7 on the same settings.

A row that does not split the model (``naive-1``) trains the plain
``nn.Sequential`` on its device whichever engine was asked for: there is
nothing to pipeline, and its record still names the engine the row was run
for, so that engine's speedups have their baseline. Every other row is the
model cut by the row's balance over its devices, with the row's chunks and
checkpoint mode (``naive-N``: one chunk).
"""

from __future__ import annotations

import importlib.util
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpipe_bench import models, precision
from gpipe_bench.devices import memory_slots
from gpipe_bench.errors import HarnessError
from gpipe_bench.jobs import Job
from gpipe_bench.pipe import GPipe

from .base import MemoryWatch, Trainer, place

if TYPE_CHECKING:
    from gpipe_bench.timeline.recorder import TimelineRecorder

__all__ = ["LocalTrainer"]


class LocalTrainer(Trainer):
    """The row's model in this process: plain on one device, or split over the row's devices by one engine."""

    def __init__(self, job: Job, balance: Optional[Sequence[int]] = None) -> None:
        super().__init__(job)
        if job.engine == "torchgpipe" and importlib.util.find_spec("torchgpipe") is None:
            raise HarnessError(
                "--engine torchgpipe: torchgpipe is not installed; install it with: pip install -e '.[peers]'"
            )
        extra: Dict[str, Any] = {}
        skip_arg = models.spec(job.model_name).skip_api_arg
        if job.engine == "torchgpipe" and skip_arg is not None:
            extra[skip_arg] = "torchgpipe.skip"
        torch.manual_seed(0)
        model = models.build(job.model_name, **job.model_args, **extra)
        self.balance = list(balance if balance is not None else job.row.balance or [len(model)])
        self.devices = list(job.devices) if job.split else [job.devices[0]]
        self.model: nn.Module
        if not job.split:
            self.model = model.to(place(self.devices[0]))
        else:
            kwargs: Dict[str, Any] = dict(devices=self.devices, chunks=job.row.chunks, checkpoint=job.row.checkpoint)
            if job.engine == "torchgpipe":
                import torchgpipe  # type: ignore[import-not-found, import-untyped, unused-ignore]

                self.model = torchgpipe.GPipe(model, self.balance, **kwargs)
            else:
                self.model = GPipe(model, self.balance, **kwargs)
        self.model.train()
        self._distinct, self._slots = memory_slots(self.devices)

    def parameters(self) -> List[nn.Parameter]:
        return list(self.model.parameters())

    def batch(self, watch: Optional[MemoryWatch] = None) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        s, row = self.job.settings, self.job.row
        with watch.charge(0) if watch is not None else nullcontext():
            x = torch.rand(row.batch, 3, s.input_size, s.input_size, device=place(self.devices[0]))
        y = torch.randint(0, s.classes, (row.batch,), device=place(self.devices[-1]))
        return x, y

    def step(self, x: Optional[Tensor], y: Optional[Tensor]) -> None:
        assert x is not None and y is not None
        # Our engine's workers and recomputations take this thread's autocast; the backward runs outside it.
        chosen = self.job.row.precision
        with precision.whole_step(chosen):
            with precision.forward_pass(chosen, self.job.device_type):
                loss = F.cross_entropy(self.model(x), y)
            self.loss_scale.backward(loss)

    def recording(self, recorder: "TimelineRecorder") -> AbstractContextManager[None]:
        """Our engine's cells come through its hook; a plain model is recorded by its module hooks."""
        return nullcontext() if self.job.split else recorder.model(self.model, self.devices[0])

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def memory_devices(self) -> List[str]:
        return list(self._distinct)

    def memory_parts(self) -> List[Tuple[int, nn.Module]]:
        parts = list(getattr(self.model, "partitions", [self.model]))
        return list(zip(self._slots, parts))

    def meter_owner(self) -> int:
        return self._slots[-1]
