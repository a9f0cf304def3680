"""predict/costs.py: measured costs are timed on the device they are for, and the cached model is left alone.

No GPU here: ``torch.cuda``'s timing functions are replaced by recorders, and
tensors asked for on a GPU are made on the host, so what is checked is where
each timing asks its tensors to be and that it waits for the device around
the timed work.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

import pytest
import torch

from gpipe_bench.predict import costs, hardware
from gpipe_bench.predict.costs import MeasuredCosts, ModelKey
from gpipe_bench.predict.measured import LayerTimes

CUDA = torch.device("cuda", 1)
KEY = ModelKey.of("resnet14", {"num_classes": 10}, 32)


class FakeEvent:
    """A CUDA event that records where it was recorded; 2 ms between any two."""

    recorded: List[Any] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing

    def record(self, stream: Any = None) -> None:
        FakeEvent.recorded.append(stream)

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "FakeEvent") -> float:
        return 2.0


@pytest.fixture
def no_gpu_timing(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[Tuple[str, Optional[torch.device]]]]:
    """Where tensors were asked for and what the device was asked to do, in order; GPU tensors made on the host."""
    calls: List[Tuple[str, Optional[torch.device]]] = []
    for name in ("zeros", "ones"):
        make = getattr(torch, name)

        def spy(*size: Any, device: Any = None, _make: Any = make, _name: str = name, **kwargs: Any) -> torch.Tensor:
            calls.append((_name, None if device is None else torch.device(device)))
            made: torch.Tensor = _make(*size, **kwargs)
            return made

        monkeypatch.setattr(torch, name, spy)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache", None)))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(costs, "count_named", lambda *args: None)  # no counting: only the timings make tensors
    FakeEvent.recorded = []
    yield calls


def test_cuda_costs_time_operators_and_updates_on_their_gpu(
    no_gpu_timing: List[Tuple[str, Optional[torch.device]]],
) -> None:
    measured = MeasuredCosts(KEY, str(CUDA), hardware.load("h100"))
    made = [device for name, device in no_gpu_timing if name in ("zeros", "ones")]
    assert made == [CUDA]  # the operator overhead: one tensor, on the GPU
    waits = [device for name, device in no_gpu_timing if name == "synchronize"]
    assert waits == [CUDA] * 14  # before and after each of the 7 timed batches
    no_gpu_timing.clear()

    host, device_s = measured.update(1000, 10, str(CUDA), 1, "optimizer")
    made = [device for name, device in no_gpu_timing if name in ("zeros", "ones")]
    assert made == [CUDA, CUDA]  # the weight and its gradient, on the GPU
    assert FakeEvent.recorded == [f"stream of {CUDA}"] * 10  # around each of 5 passes, on the GPU's stream
    assert device_s == pytest.approx(2e-3 / (1 << 22) * 1000)  # the events' time, not the host's clock
    assert host == measured.overhead  # one multi-tensor launch on CUDA
    assert no_gpu_timing[-1] == ("empty_cache", None)  # the GPU memory given back


def test_cpu_costs_stay_on_the_host(no_gpu_timing: List[Tuple[str, Optional[torch.device]]]) -> None:
    measured = MeasuredCosts(KEY, "cpu", hardware.load("cpu"))
    measured.update(1000, 10, "cpu", 1, "accumulate")
    assert {device for _, device in no_gpu_timing} == {torch.device("cpu")}
    assert FakeEvent.recorded == []


def test_timing_on_a_gpu_leaves_the_cached_model_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    timed: List[torch.nn.Module] = []
    released: List[str] = []

    def time_layers(model: torch.nn.Sequential, sample: torch.Tensor, device: torch.device, *args: Any) -> LayerTimes:
        model.to("meta")  # as time_layers moves its model to the device: in place
        timed.append(model)
        return LayerTimes(int(sample.size(0)), 1, [0.0] * len(model), [0.0] * len(model))

    monkeypatch.setattr(costs, "time_layers", time_layers)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append("empty_cache"))
    costs._model.cache_clear()
    try:
        cached = costs._model(KEY)
        before = [p.data_ptr() for p in cached.parameters()]
        costs._time_model(KEY, 2, CUDA, 1, rounds=1)
        assert timed and timed[0] is not cached  # a copy was timed
        assert all(p.device.type == "cpu" for p in cached.parameters())
        assert [p.data_ptr() for p in cached.parameters()] == before
        assert costs._model(KEY) is cached and released == ["empty_cache"]
        costs._time_model(KEY, 2, torch.device("cpu"), 1, rounds=1)
        assert timed[1] is cached  # the host times the cached model itself: nothing moves
    finally:
        costs._model.cache_clear()  # the cached model was moved to meta above (CPU case): build it afresh


@pytest.mark.cuda
@pytest.mark.timeout(300)
def test_on_a_gpu_the_timings_leave_the_cached_model_and_the_gpu_as_they_were() -> None:
    device = torch.device("cuda", 0)
    costs._model.cache_clear()
    cached = costs._model(KEY)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    times = costs._time_model(KEY, 4, device, 1, rounds=1, fixed=False)
    assert len(times.forward) == len(cached) and all(t >= 0 for t in times.forward)
    assert all(p.device.type == "cpu" for p in cached.parameters())
    assert costs.op_overhead(samples=100, device=device) > 0
    assert costs._time_update("optimizer", 1, device=device) > 0
    torch.cuda.synchronize(device)
    assert torch.cuda.memory_allocated(device) == before  # the copy and the tensors are gone
    if before == 0:
        assert torch.cuda.memory_reserved(device) == 0  # and their blocks given back


@pytest.mark.parametrize("cuda, device, preset", [(False, "cpu", "cpu"), (True, "cuda", "h100")])
def test_measured_costs_here_time_on_this_machines_device(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, device: str, preset: str
) -> None:
    """predict and plan both measure here: one rule for the device and the preset that prices the rest."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(costs, "op_overhead", lambda **kwargs: 1e-5)
    measured = MeasuredCosts.here(KEY)
    assert measured.device.type == device and measured.hardware.name == preset
