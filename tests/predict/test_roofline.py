"""roofline.py: device seconds per operator from counts, a preset's peaks and its measured rates."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
import torch
from torch import nn

from gpipe_bench.errors import HarnessError
from gpipe_bench.predict import costs as costs_module
from gpipe_bench.predict import roofline
from gpipe_bench.predict.costs import HardwareCosts, ModelKey
from gpipe_bench.predict.count import Affine, LayerCounts, ModelCounts, OpCost, OpGroup, PassCounts, count_model
from gpipe_bench.predict.hardware import FILTERS, PASSES, Hardware, Link, Rate, Rates, load

#: A GPU without measured rates: every operator at its roofline. 1 TFLOP/s fp32, 4 in TF32, 1 TB/s.
BARE = Hardware(
    name="bare",
    description="by hand",
    kind="gpu",
    cores=None,
    fp32_flops=1e12,
    tf32_flops=4e12,
    tf32_convs=False,
    memory_bandwidth=1e12,
    memory=1 << 30,
    launch=0.0,
    links=MappingProxyType({"pcie": Link("pcie", 1e10, 0.0)}),
    default_link="pcie",
    sources=(),
)


def _rates(name: str, share: float, overhead: float) -> Rates:
    """Every filter and pass at (overhead, share), except 3x3 forward at twice the share (Winograd)."""
    conv = {g: {p: Rate(overhead, share * (2 if (g, p) == ("3x3", "forward") else 1)) for p in PASSES} for g in FILTERS}
    return Rates(name, "by hand", MappingProxyType(conv), Rate(overhead, share))


MEASURED = dataclasses.replace(
    BARE,
    rates=MappingProxyType({"cuda_cores": _rates("cc", 0.5, 1e-5), "tensor_cores": _rates("tc", 0.25, 2e-5)}),
    memory_share=0.8,
    kernel_floor=3e-6,
)


def _conv(flops: int, nbytes: int, taps: int = 9, backward: bool = False, grouped: bool = False) -> OpCost:
    name = "aten.convolution_backward" if backward else "aten.convolution"
    return OpCost(name, "conv", 1, flops, nbytes, taps, grouped)


def test_without_rates_each_operator_is_at_its_roofline() -> None:
    assert roofline.op_seconds(OpCost("aten.mm", "matmul", 1, int(1e12), 1000), BARE) == pytest.approx(1.0)
    assert roofline.op_seconds(OpCost("aten.relu", "other", 3, 0, int(1e9)), BARE) == pytest.approx(3e-3)
    tf32 = dataclasses.replace(BARE, tf32_convs=True)
    conv, mm = _conv(int(4e12), 0), OpCost("aten.mm", "matmul", 1, int(4e12), 0)
    assert roofline.op_seconds(conv, tf32) == pytest.approx(1.0)  # TF32 for convolutions under the defaults
    assert roofline.op_seconds(mm, tf32) == pytest.approx(4.0)  # matrix products stay fp32
    assert roofline.op_seconds(conv, BARE) == roofline.op_seconds(mm, BARE)


def test_the_roofline_is_taken_per_operator_not_on_sums() -> None:
    compute = _conv(int(1e9), 0)  # 1 ms of arithmetic
    memory = OpCost("aten.relu", "other", 1, 0, int(1e9))  # 1 ms of traffic
    assert roofline.pass_seconds(PassCounts((compute, memory), views=0), BARE) == pytest.approx(2e-3)


def test_measured_rates_per_filter_and_pass_on_cuda_cores() -> None:
    big = int(1e10)
    assert roofline.op_seconds(_conv(big, 0, taps=1), MEASURED) == pytest.approx(1e-5 + big / (0.5 * 1e12))
    assert roofline.op_seconds(_conv(big, 0, taps=9), MEASURED) == pytest.approx(1e-5 + big / 1e12)  # Winograd
    assert roofline.op_seconds(_conv(big, 0, taps=7), MEASURED) == pytest.approx(1e-5 + big / 1e12)  # 1x7: 3x3's
    # a backward is the input's gradient and the filter's: two calls, each half the FLOPs
    both = 2 * (1e-5 + (big / 2) / (0.5 * 1e12))
    assert roofline.op_seconds(_conv(big, 0, taps=49, backward=True), MEASURED) == pytest.approx(both)
    mm = OpCost("aten.addmm", "matmul", 2, big, 0)
    assert roofline.op_seconds(mm, MEASURED) == pytest.approx(2 * (1e-5 + big / (0.5 * 1e12)))


def test_tensor_core_convolutions_pay_for_nchw_transposes() -> None:
    tf32 = dataclasses.replace(MEASURED, tf32_convs=True)
    big, moved = int(1e10), int(1e8)
    compute = 2e-5 + big / (0.25 * 4e12)
    transposes = 2 * moved / (0.8 * 1e12)  # each tensor read and written once more
    assert roofline.op_seconds(_conv(big, moved, taps=1), tf32) == pytest.approx(compute + transposes)
    assert roofline.transposed_bytes(_conv(big, moved), MEASURED) == 0  # CUDA cores take NCHW as it is


def test_memory_bound_operators_at_their_share_of_bandwidth_and_never_under_the_floor() -> None:
    relu = OpCost("aten.relu", "other", 1, 0, int(8e8))
    assert roofline.op_seconds(relu, MEASURED) == pytest.approx(8e8 / 0.8e12)
    tiny = OpCost("aten.add_", "other", 5, 0, 8)
    assert roofline.op_seconds(tiny, MEASURED) == pytest.approx(5 * 3e-6)
    depthwise = _conv(int(1e6), int(8e8), grouped=True)  # grouped: no dense rate, its traffic decides
    assert roofline.op_seconds(depthwise, MEASURED) == pytest.approx(8e8 / 0.8e12)


def test_efficiency_scales_device_time_and_must_be_positive() -> None:
    ops = PassCounts((OpCost("aten.mm", "matmul", 2, int(1e9), int(1e6)),), views=5)
    full = roofline.pass_seconds(ops, MEASURED)
    assert roofline.pass_seconds(ops, MEASURED, efficiency=0.5) == pytest.approx(2 * full)
    assert roofline.launches(ops) == 2  # views launch nothing
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(HarnessError, match="efficiency"):
            roofline.pass_seconds(ops, MEASURED, efficiency=bad)


def _layer() -> LayerCounts:
    return LayerCounts(
        name="toy",
        forward=(OpGroup("aten.convolution", "conv", 1, Affine(0, int(1e9)), Affine(1000, int(1e6)), 9),),
        backward=(OpGroup("aten.convolution_backward", "conv", 1, Affine(0, int(2e9)), Affine(2000, int(2e6)), 9),),
        forward_views=0,
        backward_views=1,
        out_bytes=Affine(0, 4096),
    )


def test_hardware_costs_turn_each_layer_into_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The roofline as predictions use it: HardwareCosts over a layer's counts, scaled by the efficiency."""
    counts = ModelCounts(layers=(_layer(),), sample_shape=(3, 8, 8), dtype=torch.float32)
    monkeypatch.setattr(costs_module, "count_named", lambda name, args, size, precision: counts)
    key = ModelKey.of("toy", {}, 8)
    (layer,) = HardwareCosts(key, MEASURED, efficiency=0.5).layers(4, 1, "cuda:0")
    assert layer.forward == pytest.approx((1e-5 + 4e9 / 1e12) / 0.5)  # 3x3 forward: share 1.0 here
    assert layer.backward == pytest.approx(2 * (1e-5 + 4e9 / 0.5e12) / 0.5)
    monkeypatch.setattr(
        costs_module,
        "count_named",
        lambda name, args, size, precision: dataclasses.replace(counts, dtype=torch.float16),
    )
    with pytest.raises(HarnessError, match="float32"):
        HardwareCosts(key, MEASURED)


def test_every_shipped_gpu_preset_has_measured_rates_and_counted_models_get_positive_times() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    counts = count_model(model.to("meta"), (3, 8, 8))
    for name in ("p40", "v100", "a100", "h100", "h200", "epyc-2vcpu"):
        preset = load(name)
        if preset.kind == "gpu":
            assert "cuda_cores" in preset.rates and 0 < preset.memory_share <= 1 and preset.kernel_floor > 0
        layers = counts.at(8)
        forward = [roofline.pass_seconds(layer.forward, preset) for layer in layers]
        assert all(f > 0 for f, layer in zip(forward, layers) if layer.name != "3")
        assert forward[3] == 0  # Flatten is a view: no kernel, not even the floor
