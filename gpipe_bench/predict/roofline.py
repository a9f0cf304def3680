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
- **Which unit**: PyTorch's fp32 defaults run convolutions in TF32 on tensor
  cores where the preset says so (Ampere and later:
  ``torch.backends.cudnn.allow_tf32`` defaults to True); matrix products stay
  on CUDA cores (``torch.backends.cuda.matmul.allow_tf32`` defaults to False).
- **Layout**: tensor-core convolution kernels take NHWC tensors. PyTorch's
  default layout is NCHW, so cuDNN transposes each convolution's activations
  in and out: their traffic again, read and written, at the memory rate
  (:func:`transposed_bytes`). A profile of a TF32 convolution on an A100 in
  pytorch/pytorch issue 81940 shows nchwToNhwc/nhwcToNchw kernels taking 55%
  of the convolution kernel's own time.
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


def peak_flops(hardware: Hardware, kind: str) -> float:
    """FLOP/s an operator of ``kind`` (``conv``, ``matmul``, ``other``) gets under PyTorch's fp32 defaults."""
    return hardware.conv_flops() if kind == "conv" else hardware.fp32_flops


def _check(efficiency: float) -> None:
    if not (math.isfinite(efficiency) and efficiency > 0):
        raise HarnessError(f"efficiency {efficiency!r} is not a positive share of peak; use e.g. 0.5 (1.0: peak)")


def _dense_conv(op: OpCost) -> bool:
    return op.kind == "conv" and not op.grouped


def compute_seconds(op: OpCost, hardware: Hardware) -> float:
    """Seconds of one operator's arithmetic: at its unit's measured rate, or at the peak without one."""
    if _dense_conv(op):
        unit = hardware.conv_unit
        rates = hardware.rates.get(unit)
        peak = hardware.conv_flops()
        if rates is not None:
            passes = rates.conv[filter_of(op.window)]
            if op.op.endswith("_backward"):
                half = op.flops / 2
                return passes["backward_data"].seconds(half, peak) + passes["backward_filter"].seconds(half, peak)
            return passes["forward"].seconds(op.flops, peak)
        return op.flops / peak
    if op.kind == "matmul" and "cuda_cores" in hardware.rates:
        return hardware.rates["cuda_cores"].matmul.seconds(op.flops, hardware.fp32_flops)
    return op.flops / peak_flops(hardware, op.kind)


def transposed_bytes(op: OpCost, hardware: Hardware) -> int:
    """Bytes of the NCHW <-> NHWC transposes a tensor-core convolution of NCHW tensors adds: its traffic again."""
    if _dense_conv(op) and hardware.conv_unit == "tensor_cores" and hardware.rates:
        return op.bytes
    return 0


def op_seconds(op: OpCost, hardware: Hardware, efficiency: float = 1.0) -> float:
    """Device seconds of ``op.count`` identical operators (see the module docstring)."""
    _check(efficiency)
    bandwidth = hardware.memory_bandwidth * hardware.memory_share
    kernel = max(hardware.kernel_floor, compute_seconds(op, hardware), op.bytes / bandwidth)
    transposes = 2 * transposed_bytes(op, hardware) / bandwidth  # each transposed tensor read and written
    return op.count * (kernel + transposes) / efficiency


def pass_seconds(counts: PassCounts, hardware: Hardware, efficiency: float = 1.0) -> float:
    """Device seconds of one pass (a layer's forward or backward): :func:`op_seconds` summed over its operators."""
    _check(efficiency)
    return sum((op_seconds(op, hardware, efficiency) for op in counts.ops), 0.0)


def launches(counts: PassCounts) -> int:
    """Kernels one pass launches: one per operator that does work (views and bare allocations launch none)."""
    return counts.launches
