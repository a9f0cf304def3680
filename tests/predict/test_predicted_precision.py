"""Predictions in a precision: refusals, autocast's counts, the units each precision runs on, and the caches.

Models are tiny and counted on ``meta`` except the one ResNet-101 row the issue asks about
(counted twice, about a second each) and one plan; host time is pinned (conftest.py).
"""

from __future__ import annotations

from typing import List

import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from gpipe_bench import jobs
from gpipe_bench.cli import main
from gpipe_bench.config import Overrides
from gpipe_bench.predict import costs as costs_module
from gpipe_bench.predict.costs import HardwareCosts, ModelKey
from gpipe_bench.predict.count import count_at, count_named
from gpipe_bench.predict.hardware import load
from gpipe_bench.predict.measured import time_layers
from gpipe_bench.predict.roofline import transposed_bytes
from gpipe_bench.predict.rows import meta_model, model_key
from gpipe_bench.predict.run import predict_table
from helpers import one_line_error


def _run(args: List[str]) -> Result:
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--hardware", "v100", "--precision", "bf16"], ["v100 cannot run --precision bf16", "fp32, tf32, fp16"]),
        (["--hardware", "p40", "--precision", "bf16"], ["p40 cannot run --precision bf16"]),
        (["--hardware", "p40", "--precision", "fp16"], ["p40 has no tensor cores", "use one of: fp32, tf32"]),
        (["--hardware", "epyc-2vcpu", "--precision", "fp16"], ["epyc-2vcpu cannot run --precision fp16", "fp32, bf16"]),
        (["--hardware", "epyc-2vcpu", "--precision", "tf32"], ["epyc-2vcpu cannot run --precision tf32", "fp32, bf16"]),
        (["--precision", "fp16"], ["--precision fp16", "fp32, bf16"]),  # measured here: a CPU
        (["--precision", "tf32"], ["--precision tf32", "fp32, bf16"]),
    ],
)
def test_predict_refuses_what_the_device_cannot_run_in_one_line(args: List[str], needles: List[str]) -> None:
    one_line_error(_run(["predict", "resnet101", "--experiment", "naive-1", "--quiet", *args]), "--precision", *needles)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--hardware", "v100", "--precision", "bf16"], ["v100 cannot run --precision bf16"]),
        (["--hardware", "epyc-2vcpu", "--precision", "fp16"], ["epyc-2vcpu cannot run --precision fp16"]),
    ],
)
def test_plan_refuses_what_the_device_cannot_run_in_one_line(args: List[str], needles: List[str]) -> None:
    one_line_error(_run(["plan", "resnet101", "--devices", "0,1", "--quiet", *args]), "--precision", *needles)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--engine", "distributed", "--precision", "fp16"], ["one loss scale agreed by every stage"]),
        (["--engine", "torchgpipe", "--precision", "bf16"], ["do not take the caller's autocast"]),
    ],
)
def test_predict_refuses_what_the_engine_would_not_run_as_asked(args: List[str], needles: List[str]) -> None:
    """The engines' rules hold on a preset too: a prediction of a run that would be refused is refused."""
    command = ["predict", "resnet101", "--pipeline", "2", "--hardware", "h100", "--quiet", *args]
    one_line_error(_run(command), "--precision", *needles)


def test_bf16_predicts_resnet101_naive_1_faster_than_fp32_on_an_h100() -> None:
    table = jobs.table_for("resnet101", "speed")
    rows = [r for r in table.profile("published").rows if r.name == "naive-1"]
    throughput = {}
    for precision in ("fp32", "bf16"):
        prediction = predict_table(
            table, "published", rows, Overrides(precision=precision), None, hardware="h100", memory=False
        )
        assert prediction.precision == precision and model_key(prediction.rows[0].job).precision == precision
        throughput[precision] = prediction.rows[0].throughput
    assert throughput["bf16"] > 1.2 * throughput["fp32"]


def _convs() -> nn.Sequential:
    with torch.device("meta"):
        return nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1)
        )


def test_autocast_counts_half_the_activation_bytes_of_a_convolution_and_its_casts() -> None:
    fp32 = count_at(_convs(), (16, 32, 32), 8)
    bf16 = count_at(_convs(), (16, 32, 32), 8, precision="bf16")
    for kind in ("conv", "other"):
        for direction in ("forward", "backward"):
            full = sum(getattr(layer, direction).bytes(kind) for layer in fp32)
            half = sum(getattr(layer, direction).bytes(kind) for layer in bf16)
            if kind == "conv":
                assert 0.45 < half / full < 0.56, (kind, direction, half / full)
    assert [layer.out_bytes for layer in bf16] == [layer.out_bytes // 2 for layer in fp32]  # BatchNorm keeps bf16
    assert sum(layer.forward.flops() for layer in bf16) == sum(layer.forward.flops() for layer in fp32)
    # a cast per weight (and bias) in each forward, and its gradient's cast back in the backward
    casts = [sum(op.count for op in layer.forward.ops if op.op == "aten._to_copy") for layer in bf16]
    back = [sum(op.count for op in layer.backward.ops if op.op == "aten._to_copy") for layer in bf16]
    # the first convolution casts its fp32 input too; that input needs no gradient, so no cast comes back for it
    assert casts == [2, 0, 0, 2] and back == [1, 0, 0, 2]


def test_precisions_are_cached_apart_and_share_the_meta_model() -> None:
    fp32 = count_named("resnet14", {"num_classes": 10}, 32)
    bf16 = count_named("resnet14", {"num_classes": 10}, 32, "bf16")
    assert fp32 is not bf16 and (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert count_named("resnet14", {"num_classes": 10}, 32, "bf16") is bf16
    # activations halve (at 32x32 pixels and 4 samples the weights' casts outweigh them in the bytes moved)
    assert sum(layer.out_bytes for layer in bf16.at(4)) < 0.6 * sum(layer.out_bytes for layer in fp32.at(4))
    keys = [ModelKey.of("resnet14", {"num_classes": 10}, 32, p) for p in ("fp32", "bf16")]
    assert keys[0] != keys[1] and meta_model(keys[0]) is meta_model(keys[1])
    a100 = load("a100")
    assert HardwareCosts(keys[1], a100).counts is bf16 and HardwareCosts(keys[0], a100).counts is fp32


def test_each_precision_runs_matrix_products_and_convolutions_on_its_unit() -> None:
    a100, v100, cpu = load("a100"), load("v100"), load("epyc-2vcpu")
    assert a100.unit("conv", "fp32") == ("tensor_cores", 156e12)  # PyTorch's default: TF32 convolutions
    assert a100.unit("matmul", "fp32") == ("cuda_cores", 19.5e12)
    assert a100.unit("matmul", "tf32") == ("tensor_cores", 156e12)
    assert a100.unit("matmul", "bf16") == a100.unit("conv", "fp16") == ("tensor_cores", 312e12)
    assert a100.unit("other", "bf16") == ("cuda_cores", 19.5e12)
    assert v100.unit("conv", "tf32") == ("cuda_cores", 15.7e12)  # no TF32: the switches do nothing
    assert v100.unit("conv", "fp16") == ("tensor_cores", 125e12)
    assert cpu.unit("conv", "bf16") == ("cuda_cores", cpu.fp32_flops)  # no tensor cores
    layer = count_at(_convs(), (16, 32, 32), 8, precision="fp16")[0]
    conv = next(op for op in layer.forward.ops if op.kind == "conv")
    assert transposed_bytes(conv, v100, "fp16") == conv.bytes  # NCHW on tensor cores
    assert transposed_bytes(conv, v100, "fp16", channels_last=True) == 0
    assert transposed_bytes(conv, v100, "fp32") == 0  # CUDA cores take NCHW


def test_plan_commands_and_heading_carry_the_precision() -> None:
    args = ["plan", "resnet101", "--devices", "0,1", "--hardware", "a100", "--batch", "256", "--top", "2"]
    result = _run([*args, "--precision", "bf16", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].endswith("gpipe-bench engine, bf16)") and lines[1].startswith("precision: bf16 (autocast")
    commands = [line for line in lines if ": gpipe-bench speed" in line]
    assert len(commands) == 3 and all(c.endswith("--precision bf16") for c in commands)


def test_measured_costs_time_each_forward_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: List[bool] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.is_autocast_enabled("cpu"))
            return x * 2

    model = nn.Sequential(nn.Linear(4, 4), Probe())
    time_layers(model, torch.rand(2, 4), torch.device("cpu"), 1, rounds=1, fixed=False, precision="bf16")
    assert seen and all(seen)
    seen.clear()
    time_layers(model, torch.rand(2, 4), torch.device("cpu"), 1, rounds=1, fixed=False)
    assert seen and not any(seen)


def test_the_preset_list_names_what_each_preset_predicts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load("p40").precisions == ("fp32", "tf32")
    assert load("v100").precisions == ("fp32", "tf32", "fp16")
    assert load("h100").precisions == ("fp32", "tf32", "bf16", "fp16")
    assert load("epyc-2vcpu").precisions == ("fp32", "bf16")
    monkeypatch.setattr(costs_module, "count_named", lambda *args: None)  # refused before counting
    from gpipe_bench.errors import HarnessError

    with pytest.raises(HarnessError, match="v100 cannot run --precision bf16"):
        HardwareCosts(ModelKey.of("resnet14", {}, 32, "bf16"), load("v100"))
