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


def test_resnet14_is_resnet101s_family_at_any_width() -> None:
    """Width 64 with ImageNet's stem has torchvision's shapes; the quick profile's width 8 keeps every layer."""
    from torchvision.models import resnet as tv_resnet

    from gpipe_bench.models.resnet import flatten_resnet, resnet14

    with torch.device("meta"):
        ours = resnet14(num_classes=10)
        theirs = flatten_resnet(tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1], num_classes=10))
        narrow = resnet14(num_classes=10, width=8, stem="small")
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert [type(m).__name__ for m in narrow] == [type(m).__name__ for m in ours] and len(narrow) == 51
    assert models.count("resnet14", width=8, stem="small") == (51, 130_002)
    assert (narrow[0].kernel_size, narrow[0].stride, narrow[0].out_channels) == ((3, 3), (1, 1), 8)
    assert narrow[-1].in_features == 8 * 8 * 4  # the last stage: 8 doubled three times, times the expansion
    for kwargs, needle in (({"width": 0}, "width"), ({"stem": "cifar"}, "imagenet, small")):
        with pytest.raises(ValueError, match=needle):
            resnet14(**kwargs)  # type: ignore[arg-type]


def test_resnet14_initialisation_is_torchvisions() -> None:
    from gpipe_bench.models.resnet import resnet14

    torch.manual_seed(0)
    model = resnet14(width=16, stem="small")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)
    conv = model[4 + 4]  # the first bottleneck's 3x3 convolution
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(conv.weight.std().item() - (2.0 / fan_out) ** 0.5) < 0.02


def test_gpipe_on_channels_last_equals_the_plain_model_on_contiguous_input() -> None:
    """The quick accuracy profile runs channels_last: same outputs and gradients as the plain contiguous model."""
    from gpipe_bench.models.resnet import resnet14

    torch.manual_seed(0)
    plain = resnet14(width=4, stem="small").double()
    gpipe = GPipe(
        copy.deepcopy(plain).to(memory_format=torch.channels_last),
        [19, 32],
        devices=["cpu:0", "cpu:1"],
        chunks=2,
        checkpoint="except_last",
    )
    torch.manual_seed(2)
    x = torch.randn(8, 3, 28, 28, dtype=torch.float64)
    weight = torch.randn(8, 10, dtype=torch.float64)
    expected = run_micro_batches(plain, x, weight, 2)
    out = gpipe(x.contiguous(memory_format=torch.channels_last))
    (out * weight).sum().backward()
    assert (out.detach() - expected).norm() <= 1e-10 * expected.norm()
    for p, q in zip(gpipe.parameters(), plain.parameters()):
        assert p.grad is not None and q.grad is not None
        assert (p.grad - q.grad).norm() <= 1e-9 * max(float(q.grad.norm()), 1e-12)
    for (name, a), b in zip(gpipe.named_buffers(), plain.buffers()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


def test_resnet50_is_torchvisions_v1_5_flattened() -> None:
    """The same modules as torchvision's ResNet-50 (v1.5), in 183 layers, computing the same function."""
    import torchvision

    assert models.count("resnet50") == (183, 25_557_032)
    torch.manual_seed(0)
    ours = models.build("resnet50").double().eval()
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert torch.equal(ours(x), reference(x))
    # v1.5: a downsampling bottleneck strides in its 3x3 convolution, not the 1x1.
    assert ours.layer2_0_conv2.stride == (2, 2) and ours.layer2_0_conv1.stride == (1, 1)
