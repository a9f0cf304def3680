"""Count what each layer of a model costs, operator by operator, on the ``meta`` device.

Why counting rather than timing: a prediction for hardware the user does not
have cannot time anything, and the published tables were taken on cards few
people still own. What a layer *does* is independent of where it runs: which
aten operators its forward and its backward issue, how many FLOPs each one
performs and how many bytes each one moves. :mod:`.roofline` turns those into
seconds for a hardware preset. On ``meta`` nothing is computed, so the
published ResNet-101 is counted in about half a second and AmoebaNet-D (4,
512) in under two (plus a one-off second or two in a process's first count,
while torch loads its Python ``meta`` kernels), and a model larger than any
device costs nothing to count.

What is counted, per layer (child) of an ``nn.Sequential``:

- every operator of the layer's forward and of its backward, the backward
  taken alone, with respect to the layer's inputs and parameters (as
  :func:`gpipe_bench.pipe.balance.profile._backward` does), so a layer's cost
  never leaks into its neighbours';
- the FLOPs of each operator, from :data:`torch.utils.flop_counter.flop_registry`
  (the formulas :class:`~torch.utils.flop_counter.FlopCounterMode` uses, so
  totals agree with it: a matrix product is ``2·m·n·k``, a bias add and
  elementwise work are not counted);
- the bytes each operator reads and writes (see :func:`_tensor_bytes`);
- its kind, ``conv``, ``matmul`` or ``other``, because PyTorch's fp32 defaults
  treat them differently: on Ampere and later, convolutions run in TF32
  (``torch.backends.cudnn.allow_tf32`` defaults to True), matrix products do
  not (``torch.backends.cuda.matmul.allow_tf32`` defaults to False);
- the bytes of the layer's output (what crosses a partition boundary after
  it) and of the skip tensors it stashes for a later layer.

Which operators count as work: views (``view``, ``t``, ``expand``, ``detach``,
``as_strided``...: any operator whose schema returns an alias it does not
write) and bare allocations (``empty``, ``empty_like``...) launch no kernel
and touch no memory, so they have zero bytes and are not charged host
overhead; they are tallied apart as ``views`` in case a caller wants to.
Everything else, in-place operators included, is one operator: one kernel
launch on a GPU, one dispatch on a CPU.

Precision: under ``bf16``/``fp16`` each layer's forward runs under
:class:`Autocast`, what ``torch.autocast`` does on CUDA replayed at the
level of torch functions (autocast itself does not act on ``meta``
tensors). Its casts are operators of their own (a weight's ``_to_copy`` in
the forward, its gradient's back to fp32 in the backward), counted as any
other: they cost host time and bytes; and everything autocast writes in
half precision moves half the bytes.

Batch dependence: each layer is counted at two micro-batch sizes,
:data:`COUNTED_BATCHES`, and every operator keeps ``value(b) = a + c·b`` for
its FLOPs and its bytes (FLOPs are linear in the batch; bytes are affine,
as weights are read once whatever the batch). Any micro-batch size is then
one multiply-add per operator away, without counting again. The sizes are 2
and 3 rather than 1 and 2 because training-mode BatchNorm refuses a batch of
one value per channel, which a batch of 1 is after a global pooling (the
tiny ResNet at 32×32 pixels ends at 1×1).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from .. import models
from ..errors import HarnessError
from ..metakernels import meta_shapes
from ..pipe.microbatch import as_tuple, unpack
from ..pipe.skip.tracker import SkipKey, SkipTracker, use_skip_tracker
from ..precision import DEFAULT, autocast_dtype

__all__ = [
    "KINDS",
    "Autocast",
    "DIRECTIONS",
    "COUNTED_BATCHES",
    "Affine",
    "OpGroup",
    "OpCost",
    "PassCounts",
    "LayerAt",
    "Skip",
    "LayerCounts",
    "ModelCounts",
    "count_model",
    "count_at",
    "count_named",
]

#: Operator kinds: the roofline gives convolutions and matrix products their own peaks.
KINDS = ("conv", "matmul", "other")
DIRECTIONS = ("forward", "backward")
#: The micro-batch sizes every layer is counted at; any other size is interpolated (exactly: see the module docstring).
COUNTED_BATCHES = (2, 3)

# Overload packets (``aten.convolution``) by name. Convolutions are listed by
# prefix so the backend variants a dispatch can reach (cuDNN, MKL-DNN, slow
# fallbacks) are all caught; "convert" operators share no prefix with them.
_CONV_PREFIXES = (
    "convolution",
    "_convolution",
    "cudnn_convolution",
    "mkldnn_convolution",
    "miopen_convolution",
    "_slow_conv",
    "slow_conv",
    "thnn_conv",
    "_conv_depthwise",
    "conv_depthwise",
)
# Attention kernels are matrix products too, under the same TF32 switch.
_MATMUL_NAMES = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_scaled_mm", "_addmm_activation", "mv", "addmv", "dot"}
_MATMUL_PREFIXES = ("_scaled_dot_product", "_flash_attention", "_efficient_attention")
# Allocations without a fill: memory is reserved, no kernel runs, nothing is read or written.
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
# Operators that overwrite their first argument without reading it.
_OVERWRITES = {"copy_", "fill_", "zero_"}


def _kind(name: str) -> str:
    if name.startswith(_CONV_PREFIXES):
        return "conv"
    if name in _MATMUL_NAMES or name.startswith(_MATMUL_PREFIXES):
        return "matmul"
    return "other"


# torch.autocast's CUDA op lists as the AMP documentation names them at the level of Python functions
# (https://pytorch.org/docs/stable/amp.html, "CUDA Ops that can autocast to float16" / "to float32"; the
# policy itself is aten/src/ATen/autocast_mode.cpp). Every other function runs in its inputs' dtype(s).
_LOWER = frozenset(
    "__matmul__ addbmm addmm addmv addr baddbmm bmm chain_matmul multi_dot conv1d conv2d conv3d conv_transpose1d "
    "conv_transpose2d conv_transpose3d gru_cell linear lstm_cell matmul mm mv prelu rnn_relu_cell rnn_tanh_cell "
    "scaled_dot_product_attention".split()
)
_FP32 = frozenset(
    "__pow__ __rdiv__ __rpow__ __rtruediv__ acos asin binary_cross_entropy_with_logits cosh cosine_embedding_loss "
    "cdist cosine_similarity cross_entropy cross_entropy_loss cumprod cumsum dist erfinv exp expm1 group_norm "
    "hinge_embedding_loss kl_div l1_loss layer_norm log log_softmax log10 log1p log2 margin_ranking_loss mse_loss "
    "multilabel_margin_loss multi_margin_loss nll_loss norm normalize pdist poisson_nll_loss pow prod reciprocal "
    "rsqrt sinh smooth_l1_loss soft_margin_loss softmax softmin softplus sum renorm tan triplet_margin_loss".split()
)


class Autocast(TorchFunctionMode):
    """``torch.autocast(device, dtype)`` as CUDA applies it, for tensors on ``meta`` (which autocast leaves alone).

    A function of the lower-precision list gets its floating-point tensors cast to
    ``dtype``, one of the fp32 list gets them cast to fp32, and every other runs in
    its inputs' dtypes (BatchNorm on a half-precision input writes half precision
    and keeps fp32 statistics, as cuDNN's does). The casts run through autograd,
    so a backward differentiates them as it would the real ones. As autocast does,
    a leaf that requires a gradient (a weight) is cast once while the mode is on.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self._cache: Dict[int, Tuple[Tensor, Tensor]] = {}

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.dtype in (dtype, torch.float64):
            return value
        cached = value.is_leaf and value.requires_grad and dtype == self.dtype
        if cached and id(value) in self._cache:
            return self._cache[id(value)][1]
        cast = value.to(dtype)
        if cached:
            self._cache[id(value)] = (value, cast)  # the source is kept alive so its id stays its own
        return cast

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Optional[Mapping[str, Any]] = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        dtype = self.dtype if name in _LOWER else torch.float32 if name in _FP32 else None
        if dtype is not None:
            args = [self._cast(a, dtype) for a in args]
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _autocast(precision: str) -> "AbstractContextManager[Any]":
    """Where a layer's forward is counted: under :class:`Autocast` for bf16/fp16, plainly otherwise."""
    dtype = autocast_dtype(precision)
    return Autocast(dtype) if dtype is not None else nullcontext()


@dataclass(frozen=True)
class _OpInfo:
    """What is known about an operator overload before it runs (looked up once per overload)."""

    name: str  # "aten.convolution"
    kind: str
    work: bool  # False for views and bare allocations
    decompose: bool  # a CompositeImplicitAutograd kernel exists: count what it decomposes into
    formula: Optional[Callable[..., int]]
    reads_args: bool  # False for factories like zeros_like: their tensor argument only gives a shape
    reads_self: bool  # False for copy_/fill_/zero_: the first argument is only written


@functools.lru_cache(maxsize=None)
def _info(func: torch._ops.OpOverload) -> _OpInfo:
    packet = func._overloadpacket
    short = packet.__name__
    returns = func._schema.returns
    is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    decompose = torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(),  # type: ignore[no-untyped-call]
        torch._C.DispatchKey.CompositeImplicitAutograd,
    ) or (torch._C.DispatchKey.CompositeImplicitAutograd in func.py_kernels)
    return _OpInfo(
        name=f"{func.namespace}.{short}",
        kind=_kind(short),
        work=not is_view and short not in _ALLOCATIONS,
        decompose=decompose,
        formula=flop_registry.get(packet),
        reads_args=not (short.endswith("_like") or short.startswith("new_")),
        reads_self=short not in _OVERWRITES,
    )


def _tensor_bytes(tensor: Tensor) -> int:
    """The bytes an operator moves for one tensor argument or result.

    The tensor's elements, but no more than the memory its strides span: an
    expanded tensor (stride 0, as autograd makes of a sum's gradient) is read
    from a small buffer however large it looks, while a transposed weight or
    a strided slice is read element by element. This is a traffic estimate
    for a roofline, not a cache model: a tensor read twice counts twice.
    """
    numel = tensor.numel()
    if numel == 0:
        return 0
    if not tensor.is_contiguous():
        span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
        numel = min(numel, span)
    return numel * tensor.element_size()


_Record = Tuple[str, str, int, int, int, bool]  # (operator, kind, flops, bytes, window, grouped)


def _second_pass(name: str, args: Sequence[Any]) -> int:
    """Bytes a training BatchNorm reads again: its kernels pass over the activations twice.

    Its forward first reduces the input to the batch statistics, then reads it
    again to normalise; its backward first reduces the output's gradient and the
    input, then reads both again to form the input's gradient (PyTorch's
    batch_norm_stats / batch_norm_elemt and batch_norm_backward_reduce /
    batch_norm_backward_elemt kernels, aten/src/ATen/native/cuda/Normalization.cu,
    and the CPU kernels alike). One operator, two passes: the second's reads are
    counted here, on top of the operator's arguments and results.
    """
    if "batch_norm" not in name:
        return 0
    tensors = [a for a in args if isinstance(a, Tensor)]
    if name.endswith("_backward"):
        return sum(_tensor_bytes(t) for t in tensors[:2])  # the output's gradient and the input
    training = next((a for a in args if isinstance(a, bool)), False)
    return _tensor_bytes(tensors[0]) if training and tensors else 0


def _conv_shape(name: str, args: Sequence[Any]) -> Tuple[int, bool]:
    """(filter taps, grouped) of a convolution's weight; (0, False) for any other operator.

    The forward takes the weight second, its backward third. A grouped
    convolution (depthwise, as AmoebaNet's separable ones) runs other kernels
    than a dense one, so a device model tells the two apart.
    """
    weight = args[2] if name.endswith("_backward") and len(args) > 2 else args[1] if len(args) > 1 else None
    if not isinstance(weight, Tensor) or weight.dim() < 3:
        return 0, False
    taps = 1
    for size in weight.shape[2:]:
        taps *= int(size)
    groups = next((a for a in reversed(args) if isinstance(a, int) and not isinstance(a, bool)), 1)
    return taps, groups > 1


class _Counter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records each operator that does work: name, kind, FLOPs, bytes read + written.

    Byte rule: every tensor argument is read and every tensor result is
    written, so ``c = a + b`` moves three tensors and so does the in-place
    ``a.add_(b)`` (it reads ``a`` and writes it back). Views and allocations
    move nothing. Factories such as ``zeros_like`` only write, and
    ``copy_``/``fill_`` do not read the tensor they overwrite.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.records: List[_Record] = []
        self.views = 0

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Optional[Mapping[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        info = _info(func)
        out = meta_shapes(func, args, kwargs)
        if out is not None:
            self._record(info, args, kwargs, out)
            return out
        if info.decompose:
            # As FlopCounterMode does: a composite reaching the mode is counted
            # as the operators it decomposes into (which come back through here).
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        out = func(*args, **kwargs)
        if not info.work:
            self.views += 1
            return out
        self._record(info, args, kwargs, out)
        return out

    def _record(self, info: _OpInfo, args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> None:
        flops = int(info.formula(*args, **kwargs, out_val=out)) if info.formula is not None else 0
        moved = _second_pass(info.name, args)
        moved += sum(_tensor_bytes(t) for t in tree_leaves(out) if isinstance(t, Tensor))
        if info.reads_args:
            inputs = args[1:] if not info.reads_self else args
            # An ``out=`` tensor is only written; it is counted with the result.
            reads = tree_leaves((inputs, {k: v for k, v in kwargs.items() if k != "out"}))
            moved += sum(_tensor_bytes(t) for t in reads if isinstance(t, Tensor))
        taps, grouped = _conv_shape(info.name, args) if info.kind == "conv" else (0, False)
        self.records.append((info.name, info.kind, flops, moved, taps, grouped))


@dataclass(frozen=True)
class Affine:
    """``const + per_sample·b``: a count as a function of the micro-batch size ``b``."""

    const: int
    per_sample: int

    def at(self, batch: int) -> int:
        # Counts never go negative; clamping only matters far outside the counted sizes.
        return max(0, self.const + self.per_sample * batch)

    def __add__(self, other: Affine) -> Affine:
        return Affine(self.const + other.const, self.per_sample + other.per_sample)

    @staticmethod
    def fit(small: int, large: int) -> Affine:
        """The line through ``small`` at the first of :data:`COUNTED_BATCHES` and ``large`` at the second.

        The two sizes differ by one, so the slope of integer counts is an integer.
        """
        b1, b2 = COUNTED_BATCHES
        per_sample = (large - small) // (b2 - b1)
        return Affine(small - per_sample * b1, per_sample)


_ZERO = Affine(0, 0)


@dataclass(frozen=True)
class OpGroup:
    """``count`` identical operators of one pass of a layer: same operator, kind, FLOPs and bytes at every batch."""

    op: str
    kind: str
    count: int
    flops: Affine  # per operator
    bytes: Affine  # per operator
    window: int = 0  # a convolution's filter taps (1 for 1x1, 9 for 3x3); 0 for other operators
    grouped: bool = False  # a grouped (depthwise) convolution


@dataclass(frozen=True)
class OpCost:
    """An :class:`OpGroup` at one micro-batch size: per-operator FLOPs and bytes, ``count`` times."""

    op: str
    kind: str
    count: int
    flops: int
    bytes: int
    window: int = 0
    grouped: bool = False


@dataclass(frozen=True)
class PassCounts:
    """One pass (forward or backward) of a layer at one micro-batch size."""

    ops: Tuple[OpCost, ...]
    views: int  # view and allocation operators: no kernel, no bytes

    @property
    def launches(self) -> int:
        """Operators that do work: each one a kernel launch (GPU) or a dispatch (CPU)."""
        return sum(op.count for op in self.ops)

    def flops(self, kind: Optional[str] = None) -> int:
        return sum(op.count * op.flops for op in self.ops if kind is None or op.kind == kind)

    def bytes(self, kind: Optional[str] = None) -> int:
        return sum(op.count * op.bytes for op in self.ops if kind is None or op.kind == kind)


@dataclass(frozen=True)
class LayerAt:
    """A layer's counts at one micro-batch size."""

    name: str
    batch: int
    forward: PassCounts
    backward: PassCounts
    out_bytes: int  # the layer's output: what a partition boundary right after it transfers
    stash_bytes: int  # skip tensors this layer stashes for later layers


@dataclass(frozen=True)
class Skip:
    """A skip tensor stashed by a layer: its id (shared with the layer that pops it) and its size."""

    id: int
    bytes: Affine


def _at(groups: Tuple[OpGroup, ...], batch: int) -> Tuple[OpCost, ...]:
    return tuple(
        OpCost(g.op, g.kind, g.count, g.flops.at(batch), g.bytes.at(batch), g.window, g.grouped) for g in groups
    )


@dataclass(frozen=True)
class LayerCounts:
    """A layer's counts at every micro-batch size: operator groups affine in the batch."""

    name: str
    forward: Tuple[OpGroup, ...]
    backward: Tuple[OpGroup, ...]
    forward_views: int
    backward_views: int
    out_bytes: Affine
    stashes: Tuple[Skip, ...] = ()
    pops: Tuple[int, ...] = ()  # ids of the skips this layer pops

    def at(self, batch: int) -> LayerAt:
        """The counts at micro-batch size ``batch`` (any positive size, no counting involved)."""
        if batch < 1:
            raise ValueError(f"a micro-batch holds at least one sample (batch: {batch})")
        return LayerAt(
            name=self.name,
            batch=batch,
            forward=PassCounts(_at(self.forward, batch), self.forward_views),
            backward=PassCounts(_at(self.backward, batch), self.backward_views),
            out_bytes=self.out_bytes.at(batch),
            stash_bytes=sum(s.bytes.at(batch) for s in self.stashes),
        )

    def totals(self, direction: str, kind: Optional[str] = None) -> Tuple[Affine, Affine]:
        """(FLOPs, bytes) of one pass, summed over operators (of one kind if given), affine in the batch.

        Sums are for reports; a roofline must be applied per operator (see :mod:`.roofline`).
        """
        groups = {"forward": self.forward, "backward": self.backward}[direction]
        flops, moved = _ZERO, _ZERO
        for g in groups:
            if kind is None or g.kind == kind:
                flops += Affine(g.count * g.flops.const, g.count * g.flops.per_sample)
                moved += Affine(g.count * g.bytes.const, g.count * g.bytes.per_sample)
        return flops, moved


@dataclass(frozen=True)
class ModelCounts:
    """Every layer's counts for a model and a per-sample input shape."""

    layers: Tuple[LayerCounts, ...]
    sample_shape: Tuple[int, ...]
    dtype: torch.dtype  # the input's
    precision: str = DEFAULT  # what the forwards were counted under (see the module docstring)

    def at(self, batch: int) -> List[LayerAt]:
        return [layer.at(batch) for layer in self.layers]

    def flops(self, direction: str, batch: int) -> int:
        """Total FLOPs of one pass of the whole model at micro-batch size ``batch``."""
        return sum(layer.totals(direction)[0].at(batch) for layer in self.layers)

    def boundary_bytes(self, cut: int) -> Affine:
        """Bytes a partition boundary before layer ``cut`` transfers: the output of layer ``cut - 1``
        plus every skip tensor stashed before the cut and popped after it."""
        if not 0 < cut < len(self.layers):
            raise ValueError(f"a cut lies between two layers: 0 < cut < {len(self.layers)} (cut: {cut})")
        total = self.layers[cut - 1].out_bytes
        popped_after = {i for layer in self.layers[cut:] for i in layer.pops}
        for layer in self.layers[:cut]:
            for skip in layer.stashes:
                if skip.id in popped_after:
                    total += skip.bytes
        return total


class _CountingTracker(SkipTracker):
    """A skip tracker that cuts skip connections out of each layer's graph, as partition boundaries do.

    A stashed tensor is kept as a detached leaf (requiring grad if the original
    did), so the layer that pops it differentiates with respect to it, as a
    pipeline's receiving partition does, and never reaches into the stashing
    layer's graph. The stashing layer in turn is given the stash as one more
    output to differentiate from, which is where its gradient comes back.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ids: Dict[SkipKey, int] = {}  # skips in flight
        self.next_id = 0
        self.stashed: List[Tuple[int, Tensor]] = []  # this layer's
        self.popped: List[Tuple[int, Tensor]] = []  # this layer's

    def save(self, key: SkipKey, tensor: Optional[Tensor]) -> None:
        if tensor is not None:
            self.ids[key], self.next_id = self.next_id, self.next_id + 1
            self.stashed.append((self.ids[key], tensor))
            tensor = tensor.detach().requires_grad_(tensor.requires_grad)
        super().save(key, tensor)

    def load(self, key: SkipKey) -> Optional[Tensor]:
        tensor = super().load(key)
        if tensor is not None:
            self.popped.append((self.ids.pop(key), tensor))
        return tensor


@dataclass
class _Raw:
    """One layer counted at one batch size."""

    forward: List[_Record]
    backward: List[_Record]
    forward_views: int
    backward_views: int
    out_bytes: int
    stashes: List[Tuple[int, int]]  # (skip id, bytes)
    pops: List[int]


def _plain_bytes(tensor: Tensor) -> int:
    # What a transfer of the tensor copies: every element (``.to`` makes a dense copy of a view).
    return tensor.numel() * tensor.element_size()


_Meta = Tuple[Tuple[int, ...], Tuple[int, ...], torch.dtype, bool]  # shape, stride, dtype, requires_grad
# Attributes every module has; the rest (sizes, strides, flags, indices) describe what its forward does.
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module()))
_HOOKS = tuple(k for k in _MODULE_ATTRIBUTES if k.endswith("hooks") or k.endswith("hooks_with_kwargs"))


class _Uncacheable(Exception):
    pass


def _frozen(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(_frozen(v) for v in value)
    raise _Uncacheable


def _signature(layer: nn.Module) -> Optional[Tuple[object, ...]]:
    """What a layer's cost depends on besides its input, or None when that cannot be told.

    Two layers with equal signatures fed equal input shapes issue the same
    operators: the same classes (so the same ``forward`` code) nested the same
    way, with the same plain attributes (channels, kernel sizes, strides,
    indices into a tuple...), training flags and parameter and buffer shapes.
    A module holding anything else (a function, a dict, a skip namespace) or
    carrying hooks has no signature and is always run.
    """
    parts: List[object] = []
    try:
        for name, module in layer.named_modules():
            state = vars(module)
            if any(state.get(hooks) for hooks in _HOOKS):
                return None
            attributes = tuple((k, _frozen(v)) for k, v in state.items() if k not in _MODULE_ATTRIBUTES)
            tensors = tuple(
                (k, tuple(t.shape), t.dtype, t.requires_grad)
                for k, t in (*module._parameters.items(), *module._buffers.items())
                if t is not None
            )
            parts.append((name, type(module), module.training, attributes, tensors))
    except _Uncacheable:
        return None
    return tuple(parts)


def _meta(tensor: Tensor) -> _Meta:
    return tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.requires_grad


@dataclass(frozen=True)
class _Cached:
    """A layer's counts and output shapes, reused for every layer of equal signature and input."""

    forward: List[_Record]
    backward: List[_Record]
    forward_views: int
    backward_views: int
    outputs: Tuple[_Meta, ...]
    atomic: bool


def _run(model: nn.Sequential, sample: Tensor, cache: Dict[object, _Cached], precision: str) -> Iterator[_Raw]:
    """Count each layer at the batch of ``sample``, feeding each layer the previous one's output.

    Deep models repeat themselves (ResNet-101's third stage is 23 equal
    bottlenecks, AmoebaNet's normal cells are equal within a stage), and the
    ``meta`` kernels of many operators are written in Python, so a layer
    equal to one already counted, on an equal input, is not run again: its
    counts are reused and its output is made from the recorded shapes. This
    roughly halves the time of both published models.
    """
    tracker = _CountingTracker()
    # A model's input is data and needs no gradient (unless the caller says
    # otherwise), so the first layer computes no input gradient, as in
    # training. After that, a layer's input needs a gradient exactly when the
    # previous layer's output carried one.
    batch: Tuple[Tensor, ...] = (sample,)
    atomic = True
    with use_skip_tracker(tracker), torch.enable_grad():
        for layer in model.children():
            signature = _signature(layer)
            key = None if signature is None else (signature, atomic, tuple(_meta(t) for t in batch))
            hit = cache.get(key) if key is not None else None
            if hit is not None:
                outputs = tuple(
                    torch.empty_strided(shape, stride, dtype=dtype, device="meta").requires_grad_(grad)
                    for shape, stride, dtype, grad in hit.outputs
                )
                atomic = hit.atomic
                yield _Raw(
                    hit.forward,
                    hit.backward,
                    hit.forward_views,
                    hit.backward_views,
                    out_bytes=sum(_plain_bytes(t) for t in outputs),
                    stashes=[],
                    pops=[],
                )
                batch = outputs
                continue

            leaves = tuple(
                t.detach().requires_grad_(t.requires_grad and (t.is_floating_point() or t.is_complex())) for t in batch
            )
            # Fed clones let in-place layers (ReLU(inplace=True)) modify their input, as inside a pipeline.
            fed = tuple(t.clone() if t.requires_grad else t for t in leaves)
            tracker.stashed, tracker.popped = [], []

            forward = _Counter()
            with _autocast(precision), forward:
                output = layer(unpack(fed, atomic))
            outputs, atomic = as_tuple(output)

            roots = [t for t in outputs if t.requires_grad] + [t for _, t in tracker.stashed if t.requires_grad]
            targets = [t for t in leaves if t.requires_grad] + [p for p in layer.parameters() if p.requires_grad]
            targets += [t for _, t in tracker.popped if t.requires_grad]
            # The incoming gradients exist before the layer's backward starts (they come from the next layer).
            grads = [torch.ones_like(t) for t in roots]
            backward = _Counter()
            if roots and targets:
                with backward:
                    torch.autograd.grad(roots, targets, grads, allow_unused=True)

            if key is not None and not tracker.stashed and not tracker.popped:
                cache[key] = _Cached(
                    forward.records,
                    backward.records,
                    forward.views,
                    backward.views,
                    tuple(_meta(t) for t in outputs),
                    atomic,
                )
            yield _Raw(
                forward=forward.records,
                backward=backward.records,
                forward_views=forward.views,
                backward_views=backward.views,
                out_bytes=sum(_plain_bytes(t) for t in outputs),
                stashes=[(i, _plain_bytes(t)) for i, t in tracker.stashed],
                pops=[i for i, _ in tracker.popped],
            )
            batch = tuple(t.detach().requires_grad_(t.requires_grad) for t in outputs)
            del leaves, fed, output, outputs, roots, targets, grads


def _groups(name: str, direction: str, small: List[_Record], large: List[_Record]) -> Tuple[OpGroup, ...]:
    if [r[0] for r in small] != [r[0] for r in large]:
        b1, b2 = COUNTED_BATCHES
        raise HarnessError(
            f"layer {name!r} runs different {direction} operators at micro-batch sizes {b1} and {b2}; "
            "counting needs layers whose operators do not depend on the batch size"
        )
    counts: Dict[Tuple[str, str, Affine, Affine, int, bool], int] = OrderedDict()
    for (op, kind, f1, m1, taps, grouped), (_, _, f2, m2, _, _) in zip(small, large):
        key = (op, kind, Affine.fit(f1, f2), Affine.fit(m1, m2), taps, grouped)
        counts[key] = counts.get(key, 0) + 1
    return tuple(
        OpGroup(op, kind, n, flops, moved, taps, grouped)
        for (op, kind, flops, moved, taps, grouped), n in counts.items()
    )


def _check_meta(model: nn.Sequential) -> None:
    for what, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in tensors:
            if tensor.device.type != "meta":
                raise HarnessError(
                    f"{what} {name!r} is on {tensor.device}, not meta; build the model under "
                    "`with torch.device('meta'):` so counting computes nothing"
                )


def _sample(batch: int, sample_shape: Tuple[int, ...], dtype: torch.dtype, input_grad: bool) -> Tensor:
    return torch.empty((batch, *sample_shape), device="meta", dtype=dtype).requires_grad_(input_grad)


def _runs(
    model: nn.Sequential,
    sample_shape: Tuple[int, ...],
    dtype: torch.dtype,
    input_grad: bool,
    batches: Sequence[int],
    precision: str = DEFAULT,
) -> List[List[_Raw]]:
    """Every layer counted at each of ``batches``, in training mode (the model's flags restored after)."""
    if not isinstance(model, nn.Sequential):
        raise HarnessError(f"counting needs an nn.Sequential, not {type(model).__name__}; flatten the model first")
    if not sample_shape or any(size < 1 for size in sample_shape):
        raise HarnessError(
            f"sample shape {tuple(sample_shape)} is empty or has an empty dimension; give one sample's shape, e.g. (3, 224, 224)"
        )
    if input_grad and not (dtype.is_floating_point or dtype.is_complex):
        raise HarnessError(f"an input of {dtype} cannot carry a gradient; leave input_grad off")
    _check_meta(model)
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    cache: Dict[object, _Cached] = {}
    try:
        return [list(_run(model, _sample(b, sample_shape, dtype, input_grad), cache, precision)) for b in batches]
    finally:
        for module, training in flags:
            module.training = training


def count_model(
    model: nn.Sequential,
    sample_shape: Tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    input_grad: bool = False,
    precision: str = DEFAULT,
) -> ModelCounts:
    """Count every layer of ``model`` (built on ``meta``) for inputs of per-sample shape ``sample_shape``.

    ``input_grad``: whether the model's input needs a gradient. Off for a
    model fed data, so the first layer computes no input gradient, as in
    training; on to count a slice of a model that follows other layers.
    ``precision``: a row's (:mod:`gpipe_bench.precision`); under bf16 or fp16
    every forward is counted under :class:`Autocast`.

    Layers are run in training mode, in order, in this thread (so skip
    connections work as in a plain run); their training flags are restored
    afterwards. Running a model on ``meta`` touches no data, so the model is
    used as is, not copied.
    """
    small_run, large_run = _runs(model, tuple(sample_shape), dtype, input_grad, COUNTED_BATCHES, precision)
    layers = []
    for name, small, large in zip((n for n, _ in model.named_children()), small_run, large_run):
        layers.append(
            LayerCounts(
                name=name,
                forward=_groups(name, "forward", small.forward, large.forward),
                backward=_groups(name, "backward", small.backward, large.backward),
                forward_views=small.forward_views,
                backward_views=small.backward_views,
                out_bytes=Affine.fit(small.out_bytes, large.out_bytes),
                stashes=tuple(Skip(i, Affine.fit(m1, m2)) for (i, m1), (_, m2) in zip(small.stashes, large.stashes)),
                pops=tuple(small.pops),
            )
        )
    return ModelCounts(layers=tuple(layers), sample_shape=tuple(sample_shape), dtype=dtype, precision=precision)


def _costs(records: List[_Record]) -> Tuple[OpCost, ...]:
    counts: Dict[_Record, int] = OrderedDict()
    for record in records:
        counts[record] = counts.get(record, 0) + 1
    return tuple(
        OpCost(op, kind, n, flops, moved, taps, grouped)
        for (op, kind, flops, moved, taps, grouped), n in counts.items()
    )


def count_at(
    model: nn.Sequential,
    sample_shape: Tuple[int, ...],
    batch: int,
    dtype: torch.dtype = torch.float32,
    input_grad: bool = False,
    precision: str = DEFAULT,
) -> List[LayerAt]:
    """Count every layer at one micro-batch size directly, without the affine model.

    For checking :meth:`LayerCounts.at` and for one-off questions; a caller
    that needs several sizes should call :func:`count_model` once instead.
    """
    if batch < 1:
        raise HarnessError(f"a micro-batch holds at least one sample (batch: {batch}); use a positive size")
    (run,) = _runs(model, tuple(sample_shape), dtype, input_grad, (batch,), precision)
    return [
        LayerAt(
            name=name,
            batch=batch,
            forward=PassCounts(_costs(raw.forward), raw.forward_views),
            backward=PassCounts(_costs(raw.backward), raw.backward_views),
            out_bytes=raw.out_bytes,
            stash_bytes=sum(nbytes for _, nbytes in raw.stashes),
        )
        for (name, _), raw in zip(model.named_children(), run)
    ]


def count_named(
    model_name: str, model_args: Optional[Mapping[str, Any]] = None, input_size: int = 224, precision: str = DEFAULT
) -> ModelCounts:
    """Count registered model ``model_name`` (see :func:`gpipe_bench.models.build`) on square RGB images.

    Cached in this process, by model, input size and ``precision``: a command
    line predicting many rows counts each model once. The cache holds a few
    models; counts are immutable, so sharing them is safe.
    """
    args = dict(model_args or {})
    try:
        key = tuple(sorted(args.items()))
        hash(key)
    except TypeError:
        return _count_named(model_name, args, input_size, precision)
    return _count_named_cached(model_name, key, input_size, precision)


@functools.lru_cache(maxsize=8)
def _count_named_cached(
    model_name: str, key: Tuple[Tuple[str, Any], ...], input_size: int, precision: str
) -> ModelCounts:
    return _count_named(model_name, dict(key), input_size, precision)


def _count_named(model_name: str, args: Dict[str, Any], input_size: int, precision: str) -> ModelCounts:
    if model_name not in models.names():
        raise HarnessError(f"unknown model {model_name!r}; known models: {', '.join(models.names())}")
    if input_size < 1:
        raise HarnessError(f"input size {input_size} is not a positive number of pixels; use e.g. 224")
    model = models.build_meta(model_name, **args)
    try:
        return count_model(model, (3, input_size, input_size), precision=precision)
    except ValueError as exc:
        # A model refusing the input size (AmoebaNet-D takes 32·k − 1 or 32·k pixels) says why.
        raise HarnessError(f"{model_name} cannot take {input_size}×{input_size} inputs: {exc}") from None
