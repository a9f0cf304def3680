"""ResNet-101 flattened to the 370-layer sequence of the published GPipe tables.

The published balances (e.g. ``[26, 22, 33, 44, 44, 66, 66, 69]``) count layers
of one particular flattening, and most of them cut *inside* a bottleneck. So
each bottleneck becomes 11 layers: a fork that stashes the identity, the three
conv/BN/ReLU triples (conv3's ReLU comes after the addition), and a residual
layer that pops the identity, applies the downsample if any, and adds. The
identity travels through the engine's skip API, so a cut anywhere in a block
moves it straight from the fork's device to the residual's, and the same
sequence runs as a plain ``nn.Sequential`` (or any whole slice of it).

The modules are torchvision's own (same shapes, same initialisation: Kaiming
normal fan-out convolutions, BatchNorm weight 1 and bias 0), taken out of a
``torchvision.models.resnet101`` rather than written again; only the ReLUs are
new, not in-place by default (an in-place ReLU would overwrite a stashed
tensor or a recompute's saved input).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

__all__ = ["resnet101", "resnet14", "flatten_resnet", "LAYERS_PER_BOTTLENECK"]

LAYERS_PER_BOTTLENECK = 11


def _skip_layers(api: str) -> Tuple[type, type]:
    """Fork and Residual written against a skip API: ours, or torchgpipe's for the peer engine.

    Each engine routes only the skippable layers of its own API, so a run of the
    archived torchgpipe needs the same layers decorated by torchgpipe.skip.
    """
    skip = importlib.import_module(api)

    @skip.skippable(stash=["identity"])
    class Fork(nn.Module):
        """Keeps the block's input for the residual addition."""

        def forward(self, x: Tensor) -> Any:
            yield skip.stash("identity", x)
            return x

    @skip.skippable(pop=["identity"])
    class Residual(nn.Module):
        """Adds the (downsampled) block input to the block output."""

        def __init__(self, downsample: Optional[nn.Module] = None) -> None:
            super().__init__()
            self.downsample = downsample

        def forward(self, x: Tensor) -> Any:
            identity = yield skip.pop("identity")
            if self.downsample is not None:
                identity = self.downsample(identity)
            return x + identity

    return Fork, Residual


Fork, Residual = _skip_layers("gpipe_bench.pipe.skip")
_PEER_LAYERS: Dict[str, Tuple[type, type]] = {"gpipe_bench.pipe.skip": (Fork, Residual)}


def _bottleneck(block: tv_resnet.Bottleneck, prefix: str, inplace: bool, api: str) -> "OrderedDict[str, nn.Module]":
    if api not in _PEER_LAYERS:
        _PEER_LAYERS[api] = _skip_layers(api)
    fork, residual = _PEER_LAYERS[api]
    ns = importlib.import_module(api).Namespace()
    return OrderedDict(
        [
            (f"{prefix}_fork", fork().isolate(ns)),
            (f"{prefix}_conv1", block.conv1),
            (f"{prefix}_bn1", block.bn1),
            (f"{prefix}_relu1", nn.ReLU(inplace=inplace)),
            (f"{prefix}_conv2", block.conv2),
            (f"{prefix}_bn2", block.bn2),
            (f"{prefix}_relu2", nn.ReLU(inplace=inplace)),
            (f"{prefix}_conv3", block.conv3),
            (f"{prefix}_bn3", block.bn3),
            (f"{prefix}_residual", residual(block.downsample).isolate(ns)),
            (f"{prefix}_relu3", nn.ReLU(inplace=inplace)),
        ]
    )


def flatten_resnet(
    base: tv_resnet.ResNet, inplace: bool = False, skip_api: str = "gpipe_bench.pipe.skip"
) -> nn.Sequential:
    """Any torchvision bottleneck ResNet as the flat sequence: stem 4, 11 per bottleneck, avgpool, flatten, fc."""
    layers: "OrderedDict[str, nn.Module]" = OrderedDict(
        [("conv1", base.conv1), ("bn1", base.bn1), ("relu", nn.ReLU(inplace=inplace)), ("maxpool", base.maxpool)]
    )
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for k, block in enumerate(getattr(base, stage)):
            layers.update(_bottleneck(block, f"{stage}_{k}", inplace, skip_api))
    layers["avgpool"] = base.avgpool
    layers["flatten"] = nn.Flatten(1)
    layers["fc"] = base.fc
    return nn.Sequential(layers)


def resnet14(num_classes: int = 10, inplace: bool = False, skip_api: str = "gpipe_bench.pipe.skip") -> nn.Sequential:
    """ResNet-101's family shrunk for a CPU: one bottleneck per stage (depth 14), 51 layers, flattened the same way.

    The accuracy table's quick profile trains it: the same blocks, widths,
    initialisation and skip layers as ResNet-101, so what pipelining does to
    BatchNorm, residuals and recompute is what it does to the big model.
    """
    base = tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1], num_classes=num_classes)
    return flatten_resnet(base, inplace, skip_api)


def resnet101(num_classes: int = 1000, inplace: bool = False, skip_api: str = "gpipe_bench.pipe.skip") -> nn.Sequential:
    """ResNet-101 as 370 layers: stem 4, 33 bottlenecks × 11, then avgpool, flatten, fc.

    44,549,160 parameters at 1000 classes (torchvision's count), 42,520,650 at
    10. The head pools adaptively, so any input of at least 32×32 works.
    ``skip_api`` names the module whose skip API carries the residuals
    (``"torchgpipe.skip"`` to run the same model on the archived engine).
    """
    base = tv_resnet.resnet101(num_classes=num_classes)
    return flatten_resnet(base, inplace, skip_api)
