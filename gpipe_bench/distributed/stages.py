"""Each rank builds only its own stage: the model on ``meta``, then its layers materialised and initialised.

Why per-layer seeds: a rank that holds layers 300..445 cannot replay the
random draws of layers 0..299 without building them. So layer ``k`` is
initialised from its own generator state, ``seed`` and ``k`` alone, with each
module's ``reset_parameters`` (and BatchNorm's running statistics reset). The
whole model built the same way (:func:`build_full`) is the plain reference a
distributed step must reproduce. The initial values differ from the model's
constructor's (torchvision's ResNet draws Kaiming-normal convolutions; here the
modules' own defaults), which matters for accuracy runs, not for speed or memory.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from gpipe_bench import models
from gpipe_bench.perf import layer_ranges, split

__all__ = ["stage_range", "materialize", "build_stage", "build_local", "build_full", "CarrySkips", "carried_keys"]


def stage_range(balance: Sequence[int], rank: int) -> Tuple[int, int]:
    """Layers ``[start, end)`` of stage ``rank`` under ``balance``."""
    if not 0 <= rank < len(balance):
        raise ValueError(f"rank {rank} has no stage: the balance {list(balance)} has {len(balance)} stages")
    return layer_ranges(balance)[rank]


def _reset(module: nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
        elif isinstance(sub, nn.modules.batchnorm._NormBase):
            sub.reset_running_stats()


def materialize(layers: nn.Sequential, device: torch.device, seed: int, first_index: int) -> nn.Sequential:
    """Allocate ``layers`` (built on ``meta``) on ``device``; layer ``i`` initialised from ``(seed, first_index + i)``."""
    layers = layers.to_empty(device=device)
    state = torch.random.get_rng_state()
    try:
        for i, layer in enumerate(layers):
            torch.manual_seed(seed * 1_000_003 + first_index + i)
            _reset(layer)
    finally:
        torch.random.set_rng_state(state)
    return layers


def build_stage(
    name: str, balance: Sequence[int], rank: int, device: torch.device, seed: int = 0, **kwargs: Any
) -> nn.Module:
    """Stage ``rank`` of model ``name`` split by ``balance``, on ``device``; the rest stays on ``meta``.

    The stage is a :class:`CarrySkips`: it carries skip connections that cross
    stages, and packs the arguments torch's pipelining unpacks from a tuple
    output (AmoebaNet passes its cell states as a tuple).
    """
    return _stage(_balanced_meta(name, balance, **kwargs), balance, rank, device, seed)


def build_local(
    name: str,
    balance: Sequence[int],
    rank: int,
    world: int,
    schedule: str,
    device: torch.device,
    seed: int = 0,
    **kwargs: Any,
) -> Dict[int, nn.Module]:
    """The stages rank ``rank`` holds under ``schedule`` (one; several when interleaved), by stage index.

    One model on ``meta`` for all of them: the stages are disjoint slices of it.
    """
    from .schedule import local_stages

    model = _balanced_meta(name, balance, **kwargs)
    return {s: _stage(model, balance, s, device, seed) for s in local_stages(len(balance), rank, world, schedule)}


def _balanced_meta(name: str, balance: Sequence[int], **kwargs: Any) -> nn.Sequential:
    model = models.build_meta(name, **kwargs)
    if sum(balance) != len(model):
        raise ValueError(f"balance {list(balance)} sums to {sum(balance)} but {name} has {len(model)} layers")
    return model


def _stage(model: nn.Sequential, balance: Sequence[int], index: int, device: torch.device, seed: int) -> CarrySkips:
    start, end = stage_range(balance, index)
    incoming, outgoing = carried_keys(model, balance, index)
    layers = materialize(model[start:end], device, seed, start)
    # Always wrapped: torch passes a tuple output on as separate arguments, which the wrapper packs again.
    return CarrySkips(layers, incoming, outgoing)


def build_full(name: str, device: torch.device, seed: int = 0, **kwargs: Any) -> nn.Sequential:
    """The whole model initialised exactly as its stages are: the plain reference of a distributed run."""
    return materialize(models.build_meta(name, **kwargs), device, seed, 0)


class CarrySkips(nn.Module):
    """A stage whose skip connections cross stage boundaries: the skip tensors travel as extra outputs.

    torch's pipelining sends a stage's outputs, and only those, to the next
    stage. A layer that stashes a tensor for a layer of a later stage (ResNet's
    residuals, cut inside a bottleneck) therefore has its tensor appended to
    the stage's outputs, carried through the stages in between, and handed to
    the popping layer through the same skip tracker the plain model uses.
    Gradients flow back the same way. ``incoming`` and ``outgoing`` are the
    skip keys in one order that every rank computes alike.
    """

    def __init__(self, layers: nn.Sequential, incoming: Sequence[Any], outgoing: Sequence[Any]) -> None:
        super().__init__()
        self.layers = layers
        self.incoming = list(incoming)
        self.outgoing = list(outgoing)
        # torch hands a stage its received inputs as leaves that require grad; an in-place first layer
        # (ReLU(inplace=True)) may not write into those, so it gets a copy.
        self.copy_inputs = _starts_in_place(layers)

    def forward(self, *inputs: torch.Tensor) -> Any:
        from gpipe_bench.pipe.skip.tracker import SkipTracker, use_skip_tracker

        # gloo receives only into contiguous buffers, and torch sizes the previous stage's gradient buffers
        # from the strides of this stage's input gradients (a concatenation's backward gives views).
        inputs = tuple(_ContiguousGrad.apply(t, self.copy_inputs) if t.requires_grad else t for t in inputs)
        count = len(inputs) - len(self.incoming)
        value: Any = inputs[0] if count == 1 else tuple(inputs[:count])
        tracker = SkipTracker()
        tracker.tensors.update(zip(self.incoming, inputs[count:]))
        with use_skip_tracker(tracker):
            out = self.layers(value)
        # gloo sends only contiguous tensors; a stage may end on a view.
        values = tuple(t.contiguous() for t in (out if isinstance(out, tuple) else (out,)))
        carried = tuple(tracker.tensors[key].contiguous() for key in self.outgoing)  # type: ignore[union-attr]
        if not carried:
            return values if isinstance(out, tuple) else values[0]
        return (*values, *carried)


class _ContiguousGrad(torch.autograd.Function):
    """Identity (a view, or a copy for in-place first layers) whose backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, copy: bool) -> torch.Tensor:
        return tensor.clone() if copy else tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return grad.contiguous(), None


def _starts_in_place(module: nn.Module) -> bool:
    """Whether the first layer that ``module`` runs writes into its input (``inplace=True``)."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[0]
    return bool(getattr(module, "inplace", False))


def carried_keys(model: nn.Sequential, balance: Sequence[int], rank: int) -> Tuple[List[Any], List[Any]]:
    """Skip keys entering and leaving stage ``rank``: stashed before it and popped in or after it; and
    stashed in or before it and popped after it. The order is the model's, the same on every rank."""
    from gpipe_bench.pipe.skip.layout import inspect_skip_layout

    routes = inspect_skip_layout(split(model, balance)).routes
    incoming = [key for key, (stash, pop) in routes.items() if stash < rank <= pop]
    outgoing = [key for key, (stash, pop) in routes.items() if stash <= rank < pop]
    return incoming, outgoing
