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
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

__all__ = ["resnet101", "resnet50", "resnet14", "flatten_resnet", "LAYERS_PER_BOTTLENECK", "STEMS"]

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
    base: Union[tv_resnet.ResNet, _Family], inplace: bool = False, skip_api: str = "gpipe_bench.pipe.skip"
) -> nn.Sequential:
    """Any bottleneck ResNet (torchvision's, or a :class:`_Family`) as the flat sequence: stem 4, 11 per bottleneck, avgpool, flatten, fc."""
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


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One stage as torchvision builds it: the first bottleneck strides and projects the identity."""
    expansion = tv_resnet.Bottleneck.expansion
    out = []
    for k in range(blocks):
        downsample = None
        if k == 0 and (stride != 1 or inplanes != planes * expansion):
            downsample = nn.Sequential(
                tv_resnet.conv1x1(inplanes, planes * expansion, stride), nn.BatchNorm2d(planes * expansion)
            )
        out.append(tv_resnet.Bottleneck(inplanes, planes, stride if k == 0 else 1, downsample))
        inplanes = planes * expansion
    return nn.Sequential(*out)


class _Family(nn.Module):
    """The parts of a bottleneck ResNet that :func:`flatten_resnet` reads, at any width and stem.

    torchvision's ``ResNet`` fixes the stage widths at 64-128-256-512 (its
    ``width_per_group`` scales only a bottleneck's inner convolution), so a
    member of the family small enough to converge on a CPU is built here from
    torchvision's own ``Bottleneck`` and initialised as torchvision does.
    """

    def __init__(self, blocks: Sequence[int], width: int, stem_kernel: int, stem_stride: int, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, stem_kernel, stem_stride, stem_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        for s, count in enumerate(blocks):
            stage = _stage(inplanes, width * 2**s, count, 1 if s == 0 else 2)
            setattr(self, f"layer{s + 1}", stage)
            inplanes = width * 2**s * tv_resnet.Bottleneck.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


#: The stems of the family: ImageNet's (7x7 convolution, stride 2) and one for 28x28 or 32x32 images
#: (3x3, stride 1), which keeps the layers after the max-pool at 14x14 instead of 7x7.
STEMS: Dict[str, Tuple[int, int]] = {"imagenet": (7, 2), "small": (3, 1)}


def resnet14(
    num_classes: int = 10,
    inplace: bool = False,
    skip_api: str = "gpipe_bench.pipe.skip",
    width: int = 64,
    stem: str = "imagenet",
) -> nn.Sequential:
    """ResNet-101's family shrunk for a CPU: one bottleneck per stage (depth 14), 51 layers, flattened the same way.

    The accuracy table's quick profile trains it: the same blocks, layers,
    initialisation and skip layers as ResNet-101, so what pipelining does to
    BatchNorm, residuals and recompute is what it does to the big model.
    ``width`` is the first stage's width (64 as in ResNet-101; the stages
    double it and a bottleneck's output is four times it); ``stem`` is a key
    of :data:`STEMS`.
    """
    if width < 1:
        raise ValueError(f"width must be a positive channel count, not {width}")
    if stem not in STEMS:
        raise ValueError(f"stem {stem!r} is not known; use one of: {', '.join(STEMS)}")
    kernel, stride = STEMS[stem]
    base = _Family([1, 1, 1, 1], width, kernel, stride, num_classes)
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


def resnet50(num_classes: int = 1000, inplace: bool = False, skip_api: str = "gpipe_bench.pipe.skip") -> nn.Sequential:
    """ResNet-50 as 183 layers: stem 4, 16 bottlenecks × 11, then avgpool, flatten, fc.

    torchvision's ResNet-50 is v1.5 (the stride of a downsampling block in its
    3×3 convolution), the model of NVIDIA's and others' published training
    throughput: 25,557,032 parameters at 1000 classes.
    """
    base = tv_resnet.resnet50(num_classes=num_classes)
    return flatten_resnet(base, inplace, skip_api)
