"""Turn counted FLOPs and bytes into seconds for a hardware preset: a roofline per operator.

Why per operator: an operator is limited either by arithmetic or by memory
traffic, ``max(flops / peak, bytes / bandwidth)``. Applied to a layer's sums
instead, a compute-bound convolution would hide the bandwidth-bound
BatchNorm and ReLU beside it (the max of sums is less than the sum of maxes),
and those are most of a ResNet's operators. :mod:`.count` keeps its counts
per group of identical operators for this reason.

The peak an operator gets depends on its kind and on PyTorch's fp32
defaults: convolutions run in TF32 where the preset says so (Ampere and
later: ``torch.backends.cudnn.allow_tf32`` defaults to True); matrix products
and everything else stay in fp32 (``torch.backends.cuda.matmul.allow_tf32``
defaults to False).

Host time, ``operators × op_overhead``, is reported apart from device time:
whether it overlaps is the simulator's call (on a GPU the host only issues
asynchronous kernels; on a CPU the host does the work itself).

``efficiency`` is the one fitted scale: the share of both peaks that real
kernels reach. It divides device time and leaves host time alone.
"""

from __future__ import annotations

import math

import torch

from ..errors import HarnessError
from .count import OpCost, PassCounts
from .hardware import Hardware

__all__ = ["peak_flops", "op_seconds", "pass_seconds", "host_seconds", "check_dtype"]


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


def op_seconds(op: OpCost, hardware: Hardware, efficiency: float = 1.0) -> float:
    """Device seconds of ``op.count`` identical operators: each at the slower of its two roofs."""
    _check(efficiency)
    compute = op.flops / peak_flops(hardware, op.kind)
    memory = op.bytes / hardware.memory_bandwidth
    return op.count * max(compute, memory) / efficiency


def pass_seconds(counts: PassCounts, hardware: Hardware, efficiency: float = 1.0) -> float:
    """Device seconds of one pass (a layer's forward or backward): :func:`op_seconds` summed over its operators."""
    _check(efficiency)
    return sum((op_seconds(op, hardware, efficiency) for op in counts.ops), 0.0)


def host_seconds(counts: PassCounts, hardware: Hardware) -> float:
    """Host seconds of one pass: one ``op_overhead`` per operator that does work (views are free)."""
    return counts.launches * hardware.op_overhead
