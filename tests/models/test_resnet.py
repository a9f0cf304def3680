"""ResNet-101 of the published tables: structure, counts, and GPipe transparency at every published cut."""

from __future__ import annotations

import copy
from typing import List

import pytest
import torch
from torch import nn

from gpipe_bench import models
from gpipe_bench.models.resnet import LAYERS_PER_BOTTLENECK, Fork, Residual, resnet101
from gpipe_bench.pipe import GPipe
from helpers import run_micro_batches

# The balances of the ResNet-101 speed and accuracy tables (gpipe_bench/configs/resnet101-speed.yaml, gpipe_bench/configs/resnet101-accuracy.yaml).
PUBLISHED_BALANCES = [
    [370],
    [140, 230],
    [47, 96, 118, 109],
    [26, 22, 33, 44, 44, 66, 66, 69],
]


@pytest.mark.parametrize("classes, params", [(10, 42_520_650), (1000, 44_549_160)])
def test_parameter_count(classes: int, params: int) -> None:
    assert models.count("resnet101", num_classes=classes) == (370, params)


def test_layer_structure() -> None:
    with torch.device("meta"):
        model = resnet101(num_classes=10)
    kinds = [type(layer).__name__ for layer in model]
    assert kinds[:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert kinds[-3:] == ["AdaptiveAvgPool2d", "Flatten", "Linear"]
    body = kinds[4:-3]
    assert len(body) == 33 * LAYERS_PER_BOTTLENECK
    block = [
        "Fork",
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Conv2d",
        "BatchNorm2d",
        "Residual",
        "ReLU",
    ]
    for k in range(33):
        assert body[k * 11 : (k + 1) * 11] == block
    assert not any(getattr(layer, "inplace", False) for layer in model)
    downsamples = [layer.module.downsample for layer in model if isinstance(layer, Residual)]
    assert sum(d is not None for d in downsamples) == 4  # first block of each stage


def test_torchvision_initialisation() -> None:
    torch.manual_seed(0)
    model = resnet101(num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)
    conv = model[0]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(conv.weight.std().item() - (2.0 / fan_out) ** 0.5) < 0.01


@pytest.mark.parametrize("balance", PUBLISHED_BALANCES)
def test_published_balances_fit(balance: List[int]) -> None:
    assert sum(balance) == 370


@pytest.fixture(scope="module")
def small_resnet() -> nn.Sequential:
    torch.manual_seed(0)
    return resnet101(num_classes=10).double()


@pytest.mark.parametrize("balance", PUBLISHED_BALANCES[1:])
def test_gpipe_at_published_cuts_equals_plain(small_resnet: nn.Sequential, balance: List[int]) -> None:
    """Batch 4 at 64×64 in 2 micro-batches over virtual CPU devices: same output and gradients.

    (At 32×32 the last stage is 1×1, so its BatchNorms normalise 2 values per
    channel and amplify gradients ~1e11: conditioning, not the engine, then
    limits agreement to ~1e-8.)
    """
    plain = copy.deepcopy(small_resnet)
    gpipe = GPipe(
        copy.deepcopy(small_resnet),
        balance,
        devices=[f"cpu:{j}" for j in range(len(balance))],
        chunks=2,
        checkpoint="except_last",
    )
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    weight = torch.randn(4, 10, dtype=torch.float64)
    expected = run_micro_batches(plain, x, weight, 2)
    out = gpipe(x)
    (out * weight).sum().backward()
    assert (out.detach() - expected).norm() <= 1e-9 * expected.norm()
    grads = [q.grad for q in plain.parameters()]
    scale = torch.cat([g.flatten() for g in grads]).norm()
    for p, g in zip(gpipe.parameters(), grads):
        assert p.grad is not None
        assert (p.grad - g).norm() <= 1e-9 * max(g.norm(), scale)


def test_slices_run_as_whole_ranges(small_resnet: nn.Sequential) -> None:
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    small_resnet.eval()
    try:
        whole = small_resnet(x)
        # Cut between blocks, and at the published cuts (inside blocks) with the pieces run in order.
        for cuts in ([4, 15, 37], [26, 48, 81, 125, 169, 235, 301]):
            edges = [0, *cuts, len(small_resnet)]
            y = x
            for a, b in zip(edges, edges[1:]):
                y = small_resnet[a:b](y)
            assert torch.allclose(y, whole, rtol=1e-12, atol=1e-12)
    finally:
        small_resnet.train()


def test_inplace_option() -> None:
    with torch.device("meta"):
        model = resnet101(inplace=True)
    assert all(layer.inplace for layer in model if isinstance(layer, nn.ReLU))


def test_fork_and_residual_are_skippable() -> None:
    assert Fork.stashable_names == {"identity"} and Residual.poppable_names == {"identity"}
