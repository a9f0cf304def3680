"""roofline.py: seconds from hand-made counts, per operator, with the peak PyTorch's fp32 defaults give each kind."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from gpipe_bench.errors import HarnessError
from gpipe_bench.predict import costs as costs_module
from gpipe_bench.predict import roofline
from gpipe_bench.predict.costs import HardwareCosts, ModelKey
from gpipe_bench.predict.count import Affine, LayerCounts, ModelCounts, OpCost, OpGroup, PassCounts, count_model
from gpipe_bench.predict.hardware import load

P40, A100 = load("p40"), load("a100")


def test_a_compute_bound_operator_runs_at_peak_flops() -> None:
    op = OpCost("aten.mm", "matmul", 1, flops=int(1e12), bytes=1000)
    assert roofline.op_seconds(op, P40) == pytest.approx(1e12 / 11.76e12)


def test_a_bandwidth_bound_operator_runs_at_memory_bandwidth() -> None:
    op = OpCost("aten.relu", "other", 3, flops=0, bytes=int(346e6))
    assert roofline.op_seconds(op, P40) == pytest.approx(3 * 1e-3)


def test_convolutions_get_tf32_on_ampere_matrix_products_do_not() -> None:
    flops = int(156e12)
    conv = OpCost("aten.convolution", "conv", 1, flops, 0)
    mm = OpCost("aten.mm", "matmul", 1, flops, 0)
    assert roofline.op_seconds(conv, A100) == pytest.approx(1.0)  # 156 TFLOPS in TF32
    assert roofline.op_seconds(mm, A100) == pytest.approx(156 / 19.5)  # fp32 by default
    # No TF32 on a P40: both at the fp32 peak.
    assert roofline.op_seconds(conv, P40) == roofline.op_seconds(mm, P40)


def test_the_roofline_is_taken_per_operator_not_on_sums() -> None:
    compute = OpCost("aten.convolution", "conv", 1, flops=int(11.76e9), bytes=0)  # 1 ms of arithmetic
    memory = OpCost("aten.relu", "other", 1, flops=0, bytes=int(346e6))  # 1 ms of traffic
    both = PassCounts((compute, memory), views=0)
    assert roofline.pass_seconds(both, P40) == pytest.approx(2e-3)  # not max(1 ms, 1 ms)


def test_efficiency_scales_device_time_not_host_time() -> None:
    ops = PassCounts((OpCost("aten.mm", "matmul", 2, int(1e9), int(1e6)),), views=5)
    full = roofline.pass_seconds(ops, P40)
    assert roofline.pass_seconds(ops, P40, efficiency=0.5) == pytest.approx(2 * full)
    assert roofline.host_seconds(ops, P40) == pytest.approx(2 * 10e-6)  # views are not charged
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(HarnessError, match="efficiency"):
            roofline.pass_seconds(ops, P40, efficiency=bad)


def _layer() -> LayerCounts:
    return LayerCounts(
        name="toy",
        forward=(OpGroup("aten.convolution", "conv", 1, Affine(0, int(1e9)), Affine(1000, int(1e6))),),
        backward=(OpGroup("aten.convolution_backward", "conv", 1, Affine(0, int(2e9)), Affine(2000, int(2e6))),),
        forward_views=0,
        backward_views=1,
        out_bytes=Affine(0, 4096),
    )


def test_hardware_costs_turn_each_layer_into_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The roofline as predictions use it: HardwareCosts over a layer's counts, scaled by the efficiency."""
    counts = ModelCounts(layers=(_layer(),), sample_shape=(3, 8, 8), dtype=torch.float32)
    monkeypatch.setattr(costs_module, "count_named", lambda name, args, size: counts)
    key = ModelKey.of("toy", {}, 8)
    (layer,) = HardwareCosts(key, P40, efficiency=0.5).layers(4, 1, "cuda:0")
    assert layer.forward == pytest.approx(4e9 / 11.76e12 / 0.5)
    assert layer.backward == pytest.approx(8e9 / 11.76e12 / 0.5)
    assert layer.forward_host == layer.backward_host == pytest.approx(10e-6)
    # Counts in another dtype have other peaks: refused where a prediction starts, not silently priced as fp32.
    monkeypatch.setattr(
        costs_module, "count_named", lambda name, args, size: dataclasses.replace(counts, dtype=torch.float16)
    )
    with pytest.raises(HarnessError, match="float32"):
        HardwareCosts(key, P40)


def test_counted_models_get_positive_times() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    counts = count_model(model.to("meta"), (3, 8, 8))
    for preset in (P40, A100, load("cpu")):
        layers = counts.at(8)
        forward = [roofline.pass_seconds(layer.forward, preset) for layer in layers]
        host = [roofline.host_seconds(layer.forward, preset) for layer in layers]
        assert all(f > 0 and h > 0 for f, h, layer in zip(forward, host, layers) if layer.name != "3")
        assert forward[3] == 0  # Flatten is a view
