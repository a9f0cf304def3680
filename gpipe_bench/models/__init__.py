"""The models of the published tables, by name: ``build(name, **kwargs)``.

Every model is a flat ``nn.Sequential`` whose layer count matches the
published balances. Builders are imported when used, so listing the models
costs nothing, and descriptions count parameters on the ``meta`` device (no
memory, seconds even for billions of parameters).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

import torch
from torch import nn

__all__ = ["ModelSpec", "names", "spec", "build", "build_meta", "count", "describe"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: where its builder lives and what it is."""

    name: str
    target: str  # "module:function"
    summary: str
    defaults: Dict[str, Any] = field(default_factory=dict)
    # Keyword naming the skip API the model's skip connections use (None: it uses none),
    # so a run of another engine can build the same layers against that engine's API.
    skip_api_arg: Optional[str] = None

    def builder(self) -> Callable[..., nn.Sequential]:
        module, function = self.target.split(":")
        return cast(Callable[..., nn.Sequential], getattr(importlib.import_module(module), function))


_MODELS: Dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "resnet101",
            "gpipe_bench.models.resnet:resnet101",
            "ResNet-101 flattened to 370 layers (torchvision modules; skip API for the residuals)",
            {"num_classes": 10},
            skip_api_arg="skip_api",
        ),
        ModelSpec(
            "resnet50",
            "gpipe_bench.models.resnet:resnet50",
            "ResNet-50 v1.5 (torchvision's: stride in the 3x3 convolution) flattened the same way, 183 layers "
            "(the vendors' published single-GPU figures)",
            {"num_classes": 1000},
            skip_api_arg="skip_api",
        ),
        ModelSpec(
            "resnet14",
            "gpipe_bench.models.resnet:resnet14",
            "ResNet-101's family with one bottleneck per stage, 51 layers flattened the same way (quick accuracy rows)",
            {"num_classes": 10},
            skip_api_arg="skip_api",
        ),
        ModelSpec(
            "amoebanetd",
            "gpipe_bench.models.amoebanet:amoebanetd",
            "AmoebaNet-D (L, F) of the GPipe tables, 60·L + 85 layers (table-era operations)",
            {"num_layers": 4, "num_filters": 512, "num_classes": 10},
        ),
        ModelSpec(
            "amoebanetd-corrected",
            "gpipe_bench.models.amoebanet:amoebanetd_corrected",
            "AmoebaNet-D with true max pooling and no extra 1×1 conv in pooling operations",
            {"num_layers": 4, "num_filters": 512, "num_classes": 10},
        ),
    ]
}


def names() -> List[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def spec(name: str) -> ModelSpec:
    """The registration of ``name``; :class:`KeyError` naming the known models otherwise."""
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}") from None


def build(name: str, **kwargs: Any) -> nn.Sequential:
    """Build model ``name``; keyword arguments override its defaults (e.g. ``num_classes``)."""
    registered = spec(name)
    return registered.builder()(**{**registered.defaults, **kwargs})


def build_meta(name: str, **kwargs: Any) -> nn.Sequential:
    """Model ``name`` on the meta device: shapes only, no memory, no initialisation cost.

    What every reader of a model's structure uses (counts, the memory predictor,
    the distributed stages, the cost model), one way.
    """
    with torch.device("meta"):
        return build(name, **kwargs)


def count(name: str, **kwargs: Any) -> Tuple[int, int]:
    """(layers, parameters) of ``name``, built on the meta device."""
    model = build_meta(name, **kwargs)
    return len(model), sum(p.numel() for p in model.parameters())


def describe(name: str, **kwargs: Any) -> str:
    """One line for listings: name, layers, parameters, summary."""
    layers, params = count(name, **kwargs)
    return f"{name}: {layers} layers, {params:,} parameters; {spec(name).summary}"
