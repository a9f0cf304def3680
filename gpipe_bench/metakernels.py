"""Fast ``meta`` results for operators whose ``meta`` kernels are slow Python decompositions.

Why: counting a model's operators (:mod:`gpipe_bench.predict.count`) and
metering its memory on ``meta`` (:mod:`gpipe_bench.memory.predict`) run every
operator of the model on shapes alone. BatchNorm's ``meta`` kernel is a
Python decomposition that took two thirds of AmoebaNet-D's count and most of
a memory prediction; its output shapes are simple. Both dispatch modes ask
:func:`meta_shapes` first and run the real kernel only when it returns None.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["meta_shapes", "FastMeta"]


def _stat_dtype(input: Tensor) -> torch.dtype:
    # BatchNorm keeps its statistics in fp32 for half-precision inputs.
    return torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype


def _batch_norm(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[Tuple[Tensor, ...]]:
    """Output shapes of a training BatchNorm forward: the normalised input, then mean and 1/std per channel."""
    input = args[0]
    if kwargs or not isinstance(input, Tensor) or input.dim() < 2:
        return None
    stats = (input.shape[1],)
    return (
        torch.empty_like(input),
        input.new_empty(stats, dtype=_stat_dtype(input)),
        input.new_empty(stats, dtype=_stat_dtype(input)),
    )


def _batch_norm_backward(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[Tuple[Optional[Tensor], ...]]:
    """Output shapes of a BatchNorm backward: the gradients ``output_mask`` asks for, None for the others.

    Unlike the ``meta`` kernel, which always makes an input gradient, this
    honours the mask as the CUDA and CPU kernels do: a first layer that needs
    no input gradient writes none.
    """
    if kwargs or len(args) != 10:
        return None
    grad_out, input, weight, mask = args[0], args[1], args[2], args[9]
    if not isinstance(grad_out, Tensor) or not isinstance(input, Tensor) or input.dim() < 2:
        return None
    stats = (input.shape[1],)
    dtype = weight.dtype if isinstance(weight, Tensor) else _stat_dtype(input)
    return (
        torch.empty_like(grad_out) if mask[0] else None,
        input.new_empty(stats, dtype=dtype) if mask[1] else None,
        input.new_empty(stats, dtype=dtype) if mask[2] else None,
    )


# Each returns None to fall back to the real kernel when the call is unusual.
_ShapeFunction = Callable[[Sequence[Any], Mapping[str, Any]], Optional[Tuple[Optional[Tensor], ...]]]
_aten = torch.ops.aten


def _like_first(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[Tuple[Optional[Tensor], ...]]:
    """An elementwise result shaped like its first tensor (a unary operator, ReLU's backward)."""
    return (torch.empty_like(args[0]),) if not kwargs else None


def _same_shapes(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[Tuple[Optional[Tensor], ...]]:
    """A binary elementwise result of two tensors of one shape, dtype and layout (else: the real kernel)."""
    a, b = args[0], args[1] if len(args) > 1 else None
    if kwargs or len(args) > 3 or not isinstance(b, Tensor):
        return None
    if a.shape != b.shape or a.dtype != b.dtype or a.stride() != b.stride():
        return None
    return (torch.empty_like(a),)


def _in_place(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[Tuple[Optional[Tensor], ...]]:
    """An in-place elementwise operator returns its first argument."""
    if kwargs or (len(args) > 1 and isinstance(args[1], Tensor) and args[1].shape != args[0].shape):
        return None
    return (args[0],)


_FAST_META: Dict[Any, _ShapeFunction] = {
    _aten.relu.default: _like_first,
    _aten.relu_.default: _in_place,
    _aten.threshold_backward.default: _like_first,
    _aten.add.Tensor: _same_shapes,
    _aten.mul.Tensor: _same_shapes,
    _aten.add_.Tensor: _in_place,
    _aten.native_batch_norm.default: _batch_norm,
    _aten._native_batch_norm_legit.default: _batch_norm,
    _aten._native_batch_norm_legit.no_stats: _batch_norm,
    _aten.native_batch_norm_backward.default: _batch_norm_backward,
}


def _shapes_only(t: Any) -> bool:
    """Whether ``t`` has shapes and no data: a ``meta`` tensor, or a fake one (a device's dtype rules, no memory).

    Fake tensors stand for CPU or CUDA tensors where autocast must apply (it skips
    ``meta`` ones); their own ``meta`` kernels would give BatchNorm half-precision
    statistics, where the CPU and CUDA kernels keep them in fp32.
    """
    return isinstance(t, Tensor) and (t.device.type == "meta" or isinstance(t, FakeTensor))


def meta_shapes(func: Any, args: Sequence[Any], kwargs: Optional[Mapping[str, Any]]) -> Any:
    """The outputs of ``func`` on ``meta`` arguments without running its kernel, or None to run it."""
    shapes = _FAST_META.get(func)
    if shapes is None or not args or not _shapes_only(args[0]):
        return None
    out = shapes(args, kwargs or {})
    if out is not None and len(out) == 1 and func not in _TUPLES:
        return out[0]
    return out


# Operators above whose result is a tuple; the others return one tensor.
_TUPLES = {
    _aten.native_batch_norm.default,
    _aten._native_batch_norm_legit.default,
    _aten._native_batch_norm_legit.no_stats,
    _aten.native_batch_norm_backward.default,
}


class FastMeta(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Run a block on ``meta`` with the fast shapes above (a plain forward for its output's shape)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = meta_shapes(func, args, kwargs)
        return out if out is not None else func(*args, **(kwargs or {}))
