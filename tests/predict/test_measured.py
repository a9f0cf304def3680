"""Timing layers on this machine: forward and backward apart, the fixed part, contention (behaviour, not speed)."""

from __future__ import annotations

import torch
from torch import nn

from gpipe_bench.predict.measured import SMALL, LayerTimes, contention, intra_op_threads, time_layers


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)
    )


def test_every_layer_is_timed_both_ways_with_a_fixed_part_within_it() -> None:
    times = time_layers(_model(), torch.rand(6, 3, 8, 8), torch.device("cpu"), thread_count=1, rounds=2)
    assert times.batch == 6 and times.threads == 1
    assert len(times.forward) == len(times.backward) == len(times.forward_fixed) == len(times.backward_fixed) == 5
    assert all(t > 0 for t in times.forward)
    # a backward's figure has one empty autograd call taken off: a tiny layer's may reach 0, never below
    assert all(t >= 0 for t in times.backward)
    for total, fixed in zip(times.forward + times.backward, times.forward_fixed + times.backward_fixed):
        assert 0.0 <= fixed <= total  # the intercept is clamped to the time itself


def test_small_batches_have_no_fixed_part() -> None:
    times = time_layers(_model(), torch.rand(SMALL, 3, 8, 8), torch.device("cpu"), thread_count=1, rounds=1)
    assert times.forward_fixed == [] and times.backward_fixed == []


def test_scaling_keeps_the_fixed_part() -> None:
    times = LayerTimes(8, 1, [1.0], [2.0], [0.2], [0.4])
    half = times.scaled(4)
    assert half.forward == [0.2 + 0.8 / 2] and half.backward == [0.4 + 1.6 / 2]


def test_the_thread_count_is_restored() -> None:
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_the_model_is_left_trainable_and_the_random_stream_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    sample = torch.rand(6, 4)
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    time_layers(model, sample, torch.device("cpu"), thread_count=1, rounds=1)
    assert torch.equal(torch.rand(1), expected)
    assert model.training


def test_contention_is_a_non_negative_fraction() -> None:
    slower = contention(_model(), torch.rand(4, 3, 8, 8), thread_count=1, workers=2, rounds=1)
    assert slower >= 0.0
