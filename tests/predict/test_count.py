"""count.py: FLOPs and bytes per layer on meta, checked against formulas, against direct counts and against torch's counter."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gpipe_bench import metakernels, models
from gpipe_bench.errors import HarnessError
from gpipe_bench.predict import count
from gpipe_bench.predict.count import Affine, LayerAt, count_at, count_model, count_named


def _meta(*layers: nn.Module) -> nn.Sequential:
    # Small layers, so made on the CPU and moved; models are built on meta directly.
    return nn.Sequential(*layers).to("meta")


def _build(name: str, **kwargs: Any) -> nn.Sequential:
    with torch.device("meta"):
        return models.build(name, **kwargs)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_flops_follow_the_formula(bias: bool) -> None:
    # torch counts addmm as its matrix product: 2·B·in·out; the bias add is not counted.
    n_in, n_out = 7, 5
    counts = count_model(_meta(nn.Linear(n_in, n_out, bias=bias)), (n_in,), input_grad=True)
    for batch in (1, 4, 9):
        layer = counts.at(batch)[0]
        forward = 2 * batch * n_in * n_out
        assert layer.forward.flops() == layer.forward.flops("matmul") == forward
        # Input gradient and weight gradient: one product each.
        assert layer.backward.flops() == layer.backward.flops("matmul") == 2 * forward


def test_the_first_layer_computes_no_input_gradient() -> None:
    # A model's input is data: only the weight gradient is computed, as in training.
    counts = count_model(_meta(nn.Linear(7, 5)), (7,))
    layer = counts.at(4)[0]
    assert layer.backward.flops() == layer.forward.flops() == 2 * 4 * 7 * 5


@pytest.mark.parametrize("bias", [True, False])
def test_conv_flops_follow_the_formula(bias: bool) -> None:
    c_in, c_out, k, stride, padding, size = 3, 4, 3, 2, 1, 9
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=bias)
    counts = count_model(_meta(conv), (c_in, size, size), input_grad=True)
    out = (size + 2 * padding - k) // stride + 1
    for batch in (1, 3, 8):
        layer = counts.at(batch)[0]
        forward = 2 * batch * c_out * out * out * c_in * k * k
        assert layer.forward.flops() == layer.forward.flops("conv") == forward
        assert layer.backward.flops() == layer.backward.flops("conv") == 2 * forward
        assert layer.out_bytes == batch * c_out * out * out * 4
        assert [op.op for op in layer.forward.ops] == ["aten.convolution"]


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_moves_its_tensor_twice_and_computes_nothing(inplace: bool) -> None:
    shape = (6, 5, 4)
    counts = count_model(_meta(nn.ReLU(inplace=inplace)), shape, input_grad=True)
    for batch in (1, 2, 7):
        layer = counts.at(batch)[0]
        nbytes = batch * 6 * 5 * 4 * 4
        assert layer.forward.bytes() == layer.forward.bytes("other") == 2 * nbytes  # read + write
        assert layer.forward.flops() == 0
        assert layer.forward.launches == 1
        # threshold_backward reads the gradient and the output, writes the input gradient.
        assert layer.backward.bytes() == 3 * nbytes
    # Without a gradient to propagate, a layer without parameters has no backward at all.
    plain = count_model(_meta(nn.ReLU()), shape).at(2)[0]
    assert plain.backward.launches == 0 and plain.backward.bytes() == 0


def test_views_are_free_but_tallied() -> None:
    layer = count_model(_meta(nn.Flatten()), (3, 4, 4), input_grad=True).at(2)[0]
    assert layer.forward.launches == 0 and layer.forward.bytes() == 0
    assert layer.forward.views >= 1
    assert layer.out_bytes == 2 * 48 * 4


def _small_conv_net() -> nn.Sequential:
    return _meta(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def _summary(layer: LayerAt) -> Tuple[Any, ...]:
    passes = []
    for p in (layer.forward, layer.backward):
        per_kind = tuple((p.flops(kind), p.bytes(kind)) for kind in count.KINDS)
        ops = sorted((op.op, op.kind, op.flops, op.bytes) for op in p.ops for _ in range(op.count))
        passes.append((per_kind, p.launches, p.views, tuple(ops)))
    return (layer.name, tuple(passes), layer.out_bytes, layer.stash_bytes)


@pytest.mark.parametrize("batch", [1, 5])
def test_affine_counts_equal_direct_counts(batch: int) -> None:
    # Batch 1 lies outside the counted sizes (2 and 3) on the other side from 5.
    model = _small_conv_net()
    affine = count_model(model, (3, 8, 8)).at(batch)
    direct = count_at(model, (3, 8, 8), batch)
    assert [_summary(a) for a in affine] == [_summary(d) for d in direct]


def test_affine_arithmetic() -> None:
    line = Affine.fit(10, 13)  # 10 at batch 2, 13 at batch 3
    assert line == Affine(4, 3)
    assert line.at(5) == 19
    assert (line + Affine(1, 1)).at(2) == 13
    assert Affine(-5, 1).at(1) == 0  # never negative


def test_the_fast_batch_norm_shapes_match_the_meta_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _meta(nn.BatchNorm2d(4))
    fast = count_at(model, (4, 5, 5), 3, input_grad=True)[0]
    monkeypatch.setattr(metakernels, "_FAST_META", {})
    slow = count_at(model, (4, 5, 5), 3, input_grad=True)[0]
    for a, b in ((fast.forward, slow.forward), (fast.backward, slow.backward)):
        assert (a.flops(), a.bytes(), a.launches) == (b.flops(), b.bytes(), b.launches)
    assert fast.out_bytes == slow.out_bytes


def _flop_counter_totals(model: nn.Sequential, shape: Tuple[int, ...], batch: int) -> Tuple[int, int]:
    x = torch.empty(batch, *shape, device="meta")
    with FlopCounterMode(display=False) as counter:
        y = model(x)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        y.float().sum().backward()
    return forward, counter.get_total_flops()


SMOKE: Dict[str, Tuple[Dict[str, Any], int]] = {
    "resnet14": ({"num_classes": 10}, 32),
    # AmoebaNet-D takes 32·k − 1 or 32·k pixels a side.
    "amoebanetd": ({"num_layers": 1, "num_filters": 8, "num_classes": 10}, 32),
}


@pytest.mark.parametrize("name, batch", [("resnet14", 5), ("amoebanetd", 4)])
def test_affine_counts_equal_direct_counts_with_skips_and_tuples(name: str, batch: int) -> None:
    args, size = SMOKE[name]
    affine = count_named(name, args, size).at(batch)  # cached: shared with the smoke test
    direct = count_at(_build(name, **args), (3, size, size), batch)
    assert [_summary(a) for a in affine] == [_summary(d) for d in direct]


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_tiny_models_count_and_agree_with_torchs_flop_counter(name: str) -> None:
    args, size = SMOKE[name]
    counts = count_named(name, args, size)
    model = _build(name, **args)
    assert len(counts.layers) == len(model)
    for batch in (1, 2, 6):
        for layer in counts.at(batch):
            for p in (layer.forward, layer.backward):
                assert all(op.count > 0 and op.flops >= 0 and op.bytes >= 0 for op in p.ops)
                assert p.views >= 0
            assert layer.out_bytes > 0 and layer.stash_bytes >= 0
    forward, backward = _flop_counter_totals(model, (3, size, size), 2)
    assert counts.flops("forward", 2) == forward > 0
    # Each layer's backward alone adds up to the whole model's backward.
    assert counts.flops("backward", 2) == backward > 0
    # Cached: the same object comes back.
    assert count_named(name, args, size) is counts


def test_boundary_bytes_include_skips_in_flight() -> None:
    counts = count_named("resnet14", {"num_classes": 10}, 32)
    names = [layer.name for layer in counts.layers]
    fork = names.index("layer1_0_fork")
    residual = names.index("layer1_0_residual")
    inside = fork + 3  # a cut inside the bottleneck: the stashed identity crosses it too
    identity = counts.layers[fork].stashes[0].bytes
    assert counts.boundary_bytes(inside) == counts.layers[inside - 1].out_bytes + identity
    after = residual + 1  # the identity was popped before this cut
    assert counts.boundary_bytes(after) == counts.layers[after - 1].out_bytes
    assert counts.layers[residual].pops == (counts.layers[fork].stashes[0].id,)
    with pytest.raises(ValueError, match="cut"):
        counts.boundary_bytes(0)


def test_mistakes_are_harness_errors() -> None:
    with pytest.raises(HarnessError, match="meta"):
        count_model(nn.Sequential(nn.Linear(2, 2)), (2,))
    with pytest.raises(HarnessError, match="unknown model 'nope'"):
        count_named("nope", {}, 32)
    with pytest.raises(HarnessError, match="amoebanetd cannot take 40×40 inputs: AmoebaNet-D needs"):
        count_named("amoebanetd", {"num_layers": 1, "num_filters": 8}, 40)
    with pytest.raises(HarnessError, match="sample shape"):
        count_model(_meta(nn.ReLU()), (0, 3))
    with pytest.raises(HarnessError, match="micro-batch"):
        count_at(_meta(nn.ReLU()), (3,), 0)


def test_training_flags_are_restored() -> None:
    model = _small_conv_net().eval()
    count_model(model, (3, 8, 8))
    assert not any(m.training for m in model.modules())


def test_a_convolution_records_its_filter_taps_and_whether_it_is_grouped() -> None:
    model = _meta(
        nn.Conv2d(4, 8, 1),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, (1, 7), padding=(0, 3)),
        nn.Conv2d(8, 8, 5, padding=2, groups=8),
    )
    layers = count_model(model, (4, 9, 9), input_grad=True).at(2)
    shapes = [[(op.op, op.window, op.grouped) for op in (*layer.forward.ops, *layer.backward.ops)] for layer in layers]
    assert shapes == [
        [("aten.convolution", taps, grouped), ("aten.convolution_backward", taps, grouped)]
        for taps, grouped in ((1, False), (9, False), (7, False), (25, True))
    ]
    relu = count_model(_meta(nn.ReLU()), (4, 9, 9), input_grad=True).at(2)[0]
    assert all(op.window == 0 and not op.grouped for op in relu.forward.ops)


def test_a_training_batch_norm_reads_its_activations_twice() -> None:
    """Statistics first, then normalisation (forward); a reduction, then the input's gradient (backward)."""
    channels, size = 4, 6
    layer = count_model(_meta(nn.BatchNorm2d(channels)), (channels, size, size), input_grad=True).at(3)[0]
    activation = 3 * channels * size * size * 4
    stats = channels * 4
    (forward,) = [op for op in layer.forward.ops if "batch_norm" in op.op]
    (backward,) = [op for op in layer.backward.ops if "batch_norm" in op.op]
    # forward: the input twice, weight, bias and the running statistics read; output and the two saved ones written
    assert forward.bytes == 2 * activation + activation + 4 * stats + 2 * stats
    # backward: the output's gradient and the input twice each, the weight and four statistics read once;
    # the input's gradient and the two parameter gradients written
    assert backward.bytes == 2 * (2 * activation) + 5 * stats + activation + 2 * stats
