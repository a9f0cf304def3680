"""Turn counted FLOPs and bytes into device seconds for a hardware preset, operator by operator.

Why per operator: an operator is limited either by arithmetic or by memory
traffic. Applied to a layer's sums instead, a compute-bound convolution would
hide the bandwidth-bound BatchNorm and ReLU beside it (the max of sums is less
than the sum of maxes), and those are most of a ResNet's operators.
:mod:`.count` keeps its counts per group of identical operators for this reason.

What an operator achieves is measured, not assumed at the peak:

- **Dense convolutions and matrix products** run at the rates a public
  microbenchmark measured per unit (CUDA cores or tensor cores), filter size
  and pass: ``overhead + FLOPs / (share x peak)`` (:class:`.hardware.Rate`).
  A convolution's backward is two calls, the input's gradient and the
  filter's, each with half the backward's FLOPs.
- **Which unit, at which peak** (:meth:`.hardware.Hardware.unit`, per
  precision): PyTorch's fp32 defaults run convolutions in TF32 on tensor
  cores where the preset says so (Ampere and later:
  ``torch.backends.cudnn.allow_tf32`` defaults to True); matrix products stay
  on CUDA cores (``torch.backends.cuda.matmul.allow_tf32`` defaults to False).
  ``tf32`` puts both on tensor cores at the TF32 peak; ``bf16``/``fp16``
  (autocast) at the tensor cores' half-precision peak. The tensor-core rates
  are DeepBench's fp16 ones (a V100's), whatever the format and GPU.
- **Layout**: tensor-core convolution kernels take NHWC tensors. PyTorch's
  default layout is NCHW, so cuDNN transposes each convolution's activations
  in and out: their traffic again, read and written, at the memory rate
  (:func:`transposed_bytes`). A profile of a TF32 convolution on an A100 in
  pytorch/pytorch issue 81940 shows nchwToNhwc/nhwcToNchw kernels taking 55%
  of the convolution kernel's own time. A model in channels_last (NHWC, as
  NVIDIA's mixed-precision examples run) pays none.
- **Everything else** is memory-bound: its bytes at the share of the memory
  bandwidth a streaming kernel reaches.
- **No kernel is shorter than the preset's floor** (a kernel launched back to
  back after another).

A preset without measured rates (the ``cpu`` one, whose peaks were measured
on this machine) runs each operator at its roofline, as before.

Host time, ``operators x (what the host spends per operator)``, is reported
apart from device time: whether it overlaps is the simulator's call. What the
host spends is :mod:`.host`'s measurement on this machine plus the preset's
kernel launch.

``efficiency`` is the one calibration ``--calibrate`` fits: it divides device
time and leaves host time alone (1.0: the measured rates as they are).
"""

from __future__ import annotations

import math

import torch

from ..errors import HarnessError
from ..precision import DEFAULT
from .count import OpCost, PassCounts
from .hardware import Hardware, filter_of

__all__ = [
    "peak_flops",
    "compute_seconds",
    "transposed_bytes",
    "op_seconds",
    "pass_seconds",
    "launches",
    "check_dtype",
]


def check_dtype(dtype: torch.dtype) -> None:
    """The presets give fp32 and TF32 peaks only: counts taken in another dtype (other peaks, other defaults) are refused."""
    if dtype != torch.float32:
        raise HarnessError(
            f"the hardware presets give fp32/TF32 peaks only, not {dtype}; count the model in torch.float32"
        )


def peak_flops(hardware: Hardware, kind: str, precision: str = DEFAULT) -> float:
    """FLOP/s an operator of ``kind`` (``conv``, ``matmul``, ``other``) gets under ``precision``."""
    return hardware.unit(kind, precision)[1]


def _check(efficiency: float) -> None:
    if not (math.isfinite(efficiency) and efficiency > 0):
        raise HarnessError(f"efficiency {efficiency!r} is not a positive share of peak; use e.g. 0.5 (1.0: peak)")


def _dense_conv(op: OpCost) -> bool:
    return op.kind == "conv" and not op.grouped


def compute_seconds(op: OpCost, hardware: Hardware, precision: str = DEFAULT) -> float:
    """Seconds of one operator's arithmetic: at its unit's measured rate, or at the peak without one."""
    unit, peak = hardware.unit(op.kind, precision)
    rates = hardware.rates.get(unit)
    if _dense_conv(op):
        if rates is not None:
            passes = rates.conv[filter_of(op.window)]
            if op.op.endswith("_backward"):
                half = op.flops / 2
                return passes["backward_data"].seconds(half, peak) + passes["backward_filter"].seconds(half, peak)
            return passes["forward"].seconds(op.flops, peak)
        return op.flops / peak
    if op.kind == "matmul" and rates is not None:
        return rates.matmul.seconds(op.flops, peak)
    return op.flops / peak


def transposed_bytes(op: OpCost, hardware: Hardware, precision: str = DEFAULT, channels_last: bool = False) -> int:
    """Bytes of the NCHW <-> NHWC transposes a tensor-core convolution of NCHW tensors adds: its traffic again.

    ``channels_last``: the model's tensors are NHWC already (none).
    """
    on_tensor_cores = hardware.unit(op.kind, precision)[0] == "tensor_cores"
    if _dense_conv(op) and on_tensor_cores and hardware.rates and not channels_last:
        return op.bytes
    return 0


def op_seconds(
    op: OpCost,
    hardware: Hardware,
    efficiency: float = 1.0,
    precision: str = DEFAULT,
    channels_last: bool = False,
) -> float:
    """Device seconds of ``op.count`` identical operators (see the module docstring)."""
    _check(efficiency)
    bandwidth = hardware.memory_bandwidth * hardware.memory_share
    kernel = max(hardware.kernel_floor, compute_seconds(op, hardware, precision), op.bytes / bandwidth)
    # each transposed tensor read and written
    transposes = 2 * transposed_bytes(op, hardware, precision, channels_last) / bandwidth
    return op.count * (kernel + transposes) / efficiency


def pass_seconds(
    counts: PassCounts,
    hardware: Hardware,
    efficiency: float = 1.0,
    precision: str = DEFAULT,
    channels_last: bool = False,
) -> float:
    """Device seconds of one pass (a layer's forward or backward): :func:`op_seconds` summed over its operators.

    ``precision``: the row's, which the counts were taken under; ``channels_last``: NHWC tensors.
    """
    _check(efficiency)
    return sum((op_seconds(op, hardware, efficiency, precision, channels_last) for op in counts.ops), 0.0)


def launches(counts: PassCounts) -> int:
    """Kernels one pass launches: one per operator that does work (views and bare allocations launch none)."""
    return counts.launches
