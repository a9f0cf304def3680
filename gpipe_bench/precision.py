"""A row's numeric precision: what ``--precision fp32|tf32|bf16|fp16`` does to a training step, in one place.

Why one module: the trainers (speed, memory, accuracy, data-parallel
replicas, torch's pipelining stages), the memory predictor and the device
check must all mean the same thing by a precision, and a user must get the
same refusal for a precision a device cannot run wherever it is asked for.

- ``fp32``: PyTorch's defaults, untouched. On NVIDIA Ampere and later that
  already runs convolutions in TF32 (``torch.backends.cudnn.allow_tf32`` is
  true by default) and matrix products in full fp32
  (``torch.backends.cuda.matmul.allow_tf32`` is false by default).
- ``tf32``: fp32 tensors with TF32 matrix products and convolutions switched
  on (CUDA only: a CPU has no TF32).
- ``bf16`` / ``fp16``: autocast on the row's device type; parameters, their
  gradients and the optimizer stay fp32. A CPU's autocast takes bf16 only.
- ``fp16`` also scales the loss (:class:`LossScale`): a step whose gradients
  overflow is skipped and counted, the scale halved, as
  :class:`torch.amp.GradScaler` does on the plain model.

The engine itself (:mod:`gpipe_bench.pipe`) knows nothing of this: it carries
the caller's autocast state into its workers and recomputations.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Dict, Iterator, Literal, Optional, Sequence, Tuple, Union, get_args

import torch
from torch import nn

from gpipe_bench.errors import HarnessError

__all__ = [
    "DEFAULT",
    "PRECISIONS",
    "Autocast",
    "LossScale",
    "Precision",
    "autocast_dtype",
    "check",
    "element_bytes",
    "forward_pass",
    "runnable",
    "whole_step",
]

Precision = Literal["fp32", "tf32", "bf16", "fp16"]
PRECISIONS: Tuple[Precision, ...] = get_args(Precision)
DEFAULT: Precision = "fp32"

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE_WORDS = {"cpu": "a CPU", "cuda": "a CUDA GPU", "meta": "the meta device"}


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in under ``precision``; None where there is no autocast (fp32, tf32)."""
    return _AUTOCAST.get(precision)


def element_bytes(precision: str) -> int:
    """Bytes per element of the activations autocast's matrix products and convolutions write."""
    dtype = autocast_dtype(precision)
    return 4 if dtype is None else torch.finfo(dtype).bits // 8


def runnable(device_type: str, bf16: bool = True) -> Tuple[Precision, ...]:
    """The precisions a device type runs: a CPU fp32 and bf16; a GPU all four (bf16 where ``bf16``: Ampere on)."""
    if device_type == "cuda":
        return PRECISIONS if bf16 else ("fp32", "tf32", "fp16")
    return ("fp32", "bf16")


def check(
    precision: str,
    device_type: str,
    bf16: bool = True,
    where: str = "",
    device: str = "",
    allowed: Optional[Sequence[str]] = None,
) -> None:
    """Raise one :class:`HarnessError` line unless ``device_type`` runs ``precision``, naming those it runs.

    ``bf16``: whether the GPU has bf16 arithmetic (``torch.cuda.is_bf16_supported``,
    or a hardware preset's flag). ``where``: what asked (a row), ``device``: the
    device in words (a preset's name), for the message; ``allowed``: the precisions
    to name where the caller runs fewer than the device type does (a preset without
    tensor cores predicts no fp16).
    """
    if precision not in PRECISIONS:
        raise HarnessError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}", param="--precision")
    if precision in runnable(device_type, bf16):
        return
    allowed = tuple(allowed) if allowed is not None else runnable(device_type, bf16)
    device = device or _DEVICE_WORDS.get(device_type, device_type)
    why = {
        "tf32": "TF32 is a format of NVIDIA tensor cores, Ampere and later",
        "fp16": "CPU autocast computes in bf16 only",
        "bf16": "bf16 arithmetic came with Ampere GPUs",
    }.get(precision, "")
    raise HarnessError(
        f"{where + ': ' if where else ''}{device} cannot run --precision {precision} ({why}); "
        f"use one of: {', '.join(allowed)}",
        param="--precision",
    )


def whole_step(precision: str) -> AbstractContextManager[Any]:
    """A whole training step (forward and backward) under ``precision``'s math flags: TF32 on under tf32.

    The flags are process-wide (not per thread), so an engine's workers and
    autograd's threads take them too; they are restored after the block.
    Every other precision leaves them alone, at no cost per step.
    """
    return _tf32() if precision == "tf32" else nullcontext()


@contextmanager
def _tf32() -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def forward_pass(precision: str, device_type: str) -> AbstractContextManager[Any]:
    """A forward (and its loss) under ``precision``: autocast on ``device_type`` for bf16 and fp16.

    Backward passes run outside it, as PyTorch recommends: they take the dtypes
    their forward chose.
    """
    dtype = autocast_dtype(precision)
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()


class LossScale:
    """The loss scaling of one training loop: torch's GradScaler under fp16, nothing otherwise.

    Use ``backward(loss)`` in place of ``loss.backward()`` and ``step(optimizer)``
    in place of ``optimizer.step()``. Under fp16 an overflowing step is skipped
    (the optimizer does not step, the scale halves): :attr:`skipped` counts them,
    and every record of an fp16 row carries the count.
    """

    def __init__(self, precision: str, device_type: str) -> None:
        self.enabled = precision == "fp16"
        self.scaler: Optional[torch.amp.GradScaler] = torch.amp.GradScaler(device_type) if self.enabled else None
        self.steps = 0
        # Skipped steps, counted on the scale's device: reading the scale each step would wait for the GPU.
        self._skipped: Union[int, torch.Tensor] = 0

    @property
    def skipped(self) -> int:
        """Steps skipped on overflow so far (read on the host: a wait for the device)."""
        return int(self._skipped)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` as the backward should see it (scaled under fp16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor) -> None:
        torch.autograd.backward(self.scale(loss))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's step, skipped under fp16 when a gradient is not finite (counted)."""
        self.steps += 1
        if self.scaler is None:
            optimizer.step()
            return
        before = self._scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # update() halves the scale exactly when the step was skipped
        self._skipped = self._skipped + (self._scale() < before).to(torch.int64)

    def _scale(self) -> torch.Tensor:
        """The current scale as a tensor on its device (a copy: update() changes it in place), without a wait."""
        assert self.scaler is not None
        current = getattr(self.scaler, "_scale", None)  # torch's own tensor; absent in another PyTorch
        if isinstance(current, torch.Tensor):
            return current.detach().clone()
        return torch.tensor(self.scaler.get_scale())

    def record(self) -> Dict[str, Any]:
        """What a record's ``extra`` says of the loss scale: nothing outside fp16."""
        if self.scaler is None:
            return {}
        return {"loss_scale": {"steps": self.steps, "skipped_steps": self.skipped, "final": self.scaler.get_scale()}}


class Autocast(nn.Module):
    """``module`` whose every forward runs under a precision's autocast.

    For engines that run forwards and backwards in one call (torch's pipelining
    schedules): the caller cannot wrap the forwards alone, and the backwards
    must stay outside autocast.
    """

    def __init__(self, module: nn.Module, precision: str, device_type: str) -> None:
        super().__init__()
        self.module = module
        self.precision, self.device_type = precision, device_type

    def forward(self, *args: object) -> object:
        with forward_pass(self.precision, self.device_type):
            return self.module(*args)
