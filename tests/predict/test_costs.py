"""predict/costs.py: the two cost sources' answers, and where measured costs are timed.

Both sources are checked on a model counted by hand (a hardware preset's
roofline per operator, copies, the optimizer step, scaling with the batch and
the threads) and, for measured costs, on known timings put in place of the
timing itself (how seconds are split into host and device work, which sizes
are timed and which scaled, when contention is measured).

No GPU here: ``torch.cuda``'s timing functions are replaced by recorders, and
tensors asked for on a GPU are made on the host, so what is checked is where
each timing asks its tensors to be and that it waits for the device around
the timed work.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch

from gpipe_bench.errors import HarnessError
from gpipe_bench.predict import costs, hardware
from gpipe_bench.predict.costs import HardwareCosts, MeasuredCosts, ModelKey
from gpipe_bench.predict.count import Affine, LayerCounts, ModelCounts, OpGroup, Skip
from gpipe_bench.predict.hardware import Hardware, Link
from gpipe_bench.predict.measured import LayerTimes
from gpipe_bench.predict.simulate import Host, LayerCost

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
    measured = MeasuredCosts(KEY, "cpu", hardware.load("epyc-2vcpu"))
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


@pytest.mark.parametrize("cuda, device, preset", [(False, "cpu", "epyc-2vcpu"), (True, "cuda", "h100")])
def test_measured_costs_here_time_on_this_machines_device(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, device: str, preset: str
) -> None:
    """predict and plan both measure here: one rule for the device and the preset that prices the rest."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(costs, "op_overhead", lambda **kwargs: 1e-5)
    measured = MeasuredCosts.here(KEY)
    assert measured.device.type == device and measured.hardware.name == preset


# -- the two cost sources on a model counted by hand -------------------------------------------------------------
#
# Three layers. conv: one convolution (8 MFLOP per sample forward, 16 backward); relu: two element-wise
# operators of 4 MB per sample forward, one of 6 MB backward; fc: a matrix product (2 MFLOP per sample),
# two backward. conv stashes a skip (16 + 100 bytes per sample) that relu pops.


def _group(op: str, kind: str, count: int, flops: Affine, moved: Affine) -> OpGroup:
    return OpGroup(op, kind, count, flops, moved)


COUNTS = ModelCounts(
    layers=(
        LayerCounts(
            "conv",
            forward=(_group("aten.convolution", "conv", 1, Affine(0, 8_000_000), Affine(1_000, 1_000)),),
            backward=(_group("aten.convolution_backward", "conv", 1, Affine(0, 16_000_000), Affine(2_000, 2_000)),),
            forward_views=1,
            backward_views=0,
            out_bytes=Affine(0, 4096),
            stashes=(Skip(7, Affine(16, 100)),),
        ),
        LayerCounts(
            "relu",
            forward=(_group("aten.relu", "other", 2, Affine(0, 1_000), Affine(0, 4_000_000)),),
            backward=(_group("aten.threshold_backward", "other", 1, Affine(0, 1_000), Affine(0, 6_000_000)),),
            forward_views=0,
            backward_views=0,
            out_bytes=Affine(0, 4096),
            pops=(7,),
        ),
        LayerCounts(
            "fc",
            forward=(_group("aten.addmm", "matmul", 1, Affine(0, 2_000_000), Affine(400, 40)),),
            backward=(_group("aten.mm", "matmul", 2, Affine(0, 2_000_000), Affine(400, 40)),),
            forward_views=0,
            backward_views=0,
            out_bytes=Affine(0, 40),
        ),
    ),
    sample_shape=(3, 32, 32),
    dtype=torch.float32,
)

NVLINK = Link("nvlink", 100e9, 1e-6)
PCIE = Link("pcie", 10e9, 1e-5)
GLOO = Link("gloo", 1e9, 5e-5)


def _preset(kind: str, links: Dict[str, Link], default: str) -> Hardware:
    """A GPU: 1 TFLOP/s fp32, 4 in TF32 for convolutions, 1 TB/s. A CPU of 4 cores: 100 GFLOP/s, 10 GB/s."""
    gpu = kind == "gpu"
    return Hardware(
        name=f"{kind}-test",
        description="counted by hand",
        kind=kind,
        cores=None if gpu else 4,
        fp32_flops=1e12 if gpu else 1e11,
        tf32_flops=4e12 if gpu else None,
        tf32_convs=gpu,
        memory_bandwidth=1e12 if gpu else 1e10,
        memory=16 << 30,
        launch=1e-5 if gpu else 2e-6,
        links=links,
        default_link=default,
        sources=(),
    )


GPU = _preset("gpu", {"nvlink": NVLINK, "pcie": PCIE}, "nvlink")
CPU = _preset("cpu", {"host": Link("host", float("inf"), 0.0), "gloo": GLOO}, "host")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(costs, "count_named", lambda *args: COUNTS)


def _device(layers: Sequence[LayerCost]) -> List[Tuple[float, float]]:
    return [(c.forward, c.backward) for c in layers]


def _host(layers: Sequence[LayerCost]) -> List[Tuple[float, float]]:
    return [(c.forward_host, c.backward_host) for c in layers]


@pytest.mark.usefixtures("counted")
def test_hardware_costs_are_each_operators_roofline() -> None:
    """conv is compute-bound at the TF32 peak, relu bandwidth-bound, fc compute-bound at fp32; per sample:"""
    gpu = HardwareCosts(KEY, GPU)
    per_sample = [(8e6 / 4e12, 16e6 / 4e12), (2 * 4e6 / 1e12, 6e6 / 1e12), (2e6 / 1e12, 2 * 2e6 / 1e12)]
    at_2 = gpu.layers(2, 1, "cuda:0")
    assert _device(at_2) == [(pytest.approx(2 * f), pytest.approx(2 * b)) for f, b in per_sample]
    assert _host(at_2) == [(1e-5, 1e-5), (2e-5, 1e-5), (1e-5, 2e-5)]  # one overhead per operator, views free
    assert all(c.nograd == 1.0 for c in at_2)
    # the batch scales the device seconds, never the host's; a GPU is whole whatever the threads
    assert _device(gpu.layers(8, 3, "cuda:0")) == [(pytest.approx(8 * f), pytest.approx(8 * b)) for f, b in per_sample]
    assert _host(gpu.layers(8, 3, "cuda:0")) == _host(at_2)
    # the fitted efficiency divides device time and leaves host time
    half = HardwareCosts(KEY, GPU, efficiency=0.5).layers(2, 1, "cuda:0")
    assert _device(half) == [(pytest.approx(2 * f), pytest.approx(2 * b)) for f, b in _device(at_2)]
    assert _host(half) == _host(at_2)


@pytest.mark.usefixtures("counted")
def test_a_cpu_worker_gets_its_threads_share_of_the_cores() -> None:
    cpu = HardwareCosts(KEY, CPU)
    assert cpu.host == Host(cores=4.0, threads=4)
    whole = cpu.layers(2, 4, "cpu:0")
    assert whole[0].forward == pytest.approx(2 * 8e6 / 1e11)  # no TF32 on a CPU
    assert _device(cpu.layers(2, 1, "cpu:0")) == [
        (pytest.approx(4 * f), pytest.approx(4 * b)) for f, b in _device(whole)
    ]
    assert _device(cpu.layers(2, 8, "cpu:0")) == _device(whole)  # more threads than cores: still the whole
    assert _host(cpu.layers(2, 1, "cpu:0")) == [(2e-6, 2e-6), (4e-6, 2e-6), (2e-6, 4e-6)]
    assert HardwareCosts(KEY, GPU).host.cores == float(os.cpu_count() or 1)  # a GPU preset names no host


@pytest.mark.usefixtures("counted")
def test_hardware_copies_between_devices_and_processes() -> None:
    gpu, cpu = HardwareCosts(KEY, GPU), HardwareCosts(KEY, CPU)
    assert gpu.link("cuda:0", "cuda:1") == NVLINK  # the preset's default between its devices
    assert gpu.link("cuda:0", "cpu") == gpu.link("cpu", "cuda:1") == PCIE  # to and from the host
    assert gpu.link("cuda:1", "cuda:1") is None and gpu.link("cpu:0", "cpu:1") is None
    assert cpu.link("cpu:0", "cpu:1") is None  # virtual CPU devices share the host's memory: nothing moves
    no_pcie = HardwareCosts(KEY, dataclasses.replace(GPU, links={"nvlink": NVLINK}))
    assert no_pcie.link("cuda:0", "cpu") == NVLINK
    assert NVLINK.seconds(1e6) == pytest.approx(1e-6 + 1e6 / 100e9)
    # torch's pipelining: a GPU per rank over the GPUs' link; CPU ranks share the host, over gloo
    assert gpu.device_type == "cuda" and gpu.rank_devices(3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert gpu.rank_link("cuda:0", "cuda:1") == NVLINK and gpu.process_link() is None
    assert cpu.device_type == "cpu" and cpu.rank_devices(2) == ["cpu", "cpu"]
    assert cpu.rank_link("cpu", "cpu") == cpu.process_link() == GLOO
    # a cut's copy: the output before it and the skips crossing it
    assert gpu.boundary_bytes(1, 8) == 4096 * 8 + (16 + 100 * 8)  # conv's output and its skip, popped by relu
    assert gpu.boundary_bytes(2, 8) == 4096 * 8  # the skip was popped before this cut


@pytest.mark.usefixtures("counted")
def test_hardware_optimizer_step_and_gradient_accumulation() -> None:
    """12 bytes per parameter at the memory bandwidth; one operator per tensor, or one per 64 where batched."""
    gpu, cpu = HardwareCosts(KEY, GPU), HardwareCosts(KEY, CPU)
    host, device = gpu.update(1000, 130, "cuda:0", 1, "optimizer")
    assert host == 3 * 1e-5 and device == pytest.approx(12_000 / 1e12)  # multi-tensor SGD on CUDA: 3 launches
    host, device = cpu.update(1000, 130, "cpu:0", 2, "optimizer")
    assert host == pytest.approx(130 * 2e-6) and device == pytest.approx(12_000 / (1e10 * 0.5))  # 2 of 4 cores
    host, device = cpu.update(1000, 130, "cpu:0", 4, "accumulate")
    assert host == pytest.approx(3 * 2e-6) and device == pytest.approx(12_000 / 1e10)
    _, slower = HardwareCosts(KEY, CPU, efficiency=0.25).update(1000, 130, "cpu:0", 4, "accumulate")
    assert slower == pytest.approx(4 * device)


@pytest.mark.usefixtures("counted")
def test_hardware_description_says_the_preset_and_a_fitted_efficiency() -> None:
    host = "host time per operator 0.0 µs forward, 0.0 µs backward (measured here)"
    assert HardwareCosts(KEY, GPU).description == f"gpu-test preset; {host}, on this host + 10 µs per kernel launch"
    fitted = HardwareCosts(KEY, GPU, efficiency=0.25, fitted="naive-1=92.539", host_speed=2.0)
    assert fitted.description == (
        f"gpu-test preset, efficiency 0.250 fitted on naive-1=92.539; {host}, on a host 2x as fast per core "
        "as this one + 10 µs per kernel launch"
    )
    assert HardwareCosts(KEY, CPU).description == f"cpu-test preset; {host}, on this host"


def test_hardware_costs_refuse_counts_in_another_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(costs, "count_named", lambda *args: dataclasses.replace(COUNTS, dtype=torch.float64))
    with pytest.raises(HarnessError, match="fp32/TF32 peaks only, not torch.float64"):
        HardwareCosts(KEY, GPU)


# -- measured costs, with the timings replaced by known figures ---------------------------------------------------

#: What timing gives at micro-batch 8 with one thread: per layer, the whole and its fixed part.
TIMED = LayerTimes(
    batch=8,
    threads=1,
    forward=[8e-3, 16e-3, 4e-3],
    backward=[16e-3, 8e-3, 8e-3],
    forward_fixed=[1e-3, 2e-3, 3e-3],
    backward_fixed=[2e-3, 1e-3, 1e-3],
    nograd=[0.5, 1.0, 0.75],
)


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch, counted: None) -> List[Tuple[int, int]]:
    """(batch, threads) of every timing asked for; each returns :data:`TIMED` at its size.

    Below a batch of 4 without fixed parts (too small to find them); with 4 threads, conv's fixed
    forward part timed at 9 ms, above its whole 8 ms.
    """
    calls: List[Tuple[int, int]] = []

    def time_model(
        key: ModelKey, batch: int, device: torch.device, threads: int, rounds: int, fixed: bool
    ) -> LayerTimes:
        assert key == KEY and device == torch.device("cpu") and rounds == 3
        calls.append((batch, threads))
        scaled = TIMED.scaled(batch)
        if batch <= 3:
            scaled = dataclasses.replace(scaled, forward_fixed=[], backward_fixed=[], nograd=[])
        if threads == 4:
            scaled = dataclasses.replace(scaled, forward_fixed=[9e-3, *scaled.forward_fixed[1:]])
        return dataclasses.replace(scaled, threads=threads)

    monkeypatch.setattr(costs, "_time_model", time_model)
    monkeypatch.setattr(costs, "op_overhead", lambda **kwargs: 1e-5)
    return calls


def test_measured_layers_split_the_timed_seconds_into_host_and_device(timed: List[Tuple[int, int]]) -> None:
    measured = MeasuredCosts(KEY, "cpu", CPU)
    layers = measured.layers(8, 1, "cpu:0")
    assert timed == [(8, 1)]
    assert _device(layers) == [(pytest.approx(7e-3), pytest.approx(14e-3)), (14e-3, 7e-3), (1e-3, 7e-3)]
    assert _host(layers) == [(1e-3, 2e-3), (2e-3, 1e-3), (3e-3, 1e-3)]  # the fixed part of each call
    assert [c.nograd for c in layers] == [0.5, 1.0, 0.75]
    # too small a batch to find the fixed part: the host's share is the counted operators at the measured overhead
    small = measured.layers(2, 2, "cpu:0")
    assert _host(small) == [(1e-5, 1e-5), (2e-5, 1e-5), (1e-5, 2e-5)] and all(c.nograd == 1.0 for c in small)
    assert [c.forward + c.forward_host for c in small] == pytest.approx(TIMED.scaled(2).forward)
    # a fixed part timed above the whole (noise) leaves the device nothing, never less
    first = measured.layers(8, 4, "cpu:0")[0]
    assert (first.forward, first.forward_host) == (0.0, 8e-3)


def test_measured_costs_time_the_largest_size_and_scale_the_smaller_ones(timed: List[Tuple[int, int]]) -> None:
    measured = MeasuredCosts(KEY, "cpu", CPU)
    lines: List[str] = []
    measured.prepare([(2, 1), (8, 1), (4, 1)], lines.append, concurrent=False)
    assert timed == [(8, 1)] and lines == ["timing every layer of resnet14 at micro-batch 8, 1 thread(s)"]
    at_8, at_2 = measured.layers(8, 1, "cpu:0"), measured.layers(2, 1, "cpu:0")
    # the fixed part stays, the rest scales with the batch: a last micro-batch of 2 beside ones of 8
    assert _host(at_2) == _host(at_8)
    assert _device(at_2) == [(pytest.approx(f / 4), pytest.approx(b / 4)) for f, b in _device(at_8)]
    measured.layers(16, 1, "cpu:0")  # larger than any timed: timed itself
    assert timed == [(8, 1), (16, 1)]
    planner = MeasuredCosts(KEY, "cpu", CPU)
    planner.affine = True  # the planner's mode: every size from the nearest timed one
    planner.prepare([(8, 1)], concurrent=False)
    at_32 = planner.layers(32, 1, "cpu:0")
    assert timed == [(8, 1), (16, 1), (8, 1)]
    assert _device(at_32) == [(pytest.approx(4 * f), pytest.approx(4 * b)) for f, b in _device(at_8)]


def test_measured_costs_measure_contention_only_where_workers_compute_side_by_side(
    timed: List[Tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: List[Tuple[Tuple[int, ...], int, int]] = []
    tiny = torch.nn.Sequential(torch.nn.Identity())
    monkeypatch.setattr(costs, "_model", lambda key: tiny)

    def contention(
        model: torch.nn.Module, sample: torch.Tensor, threads: int, workers: int, rounds: int, precision: str
    ) -> float:
        assert model is tiny and rounds == 2 and precision == "fp32"
        measured.append((tuple(sample.shape), threads, workers))
        return 0.25

    monkeypatch.setattr(costs, "contention", contention)
    alone = MeasuredCosts(KEY, "cpu", CPU)
    alone.host = Host(cores=4.0, threads=4)
    alone.prepare([(8, 1)], concurrent=False)
    assert measured == [] and alone.host.contention == 0.0
    side_by_side = MeasuredCosts(KEY, "cpu", CPU)
    side_by_side.host = Host(cores=4.0, threads=4)
    side_by_side.prepare([(8, 1), (8, 4)], concurrent=True)
    assert measured == [((8, 3, 32, 32), 1, 4)]  # 4 workers of 1 thread on 4 cores, at the largest shared size
    assert side_by_side.host == Host(cores=4.0, threads=4, contention=0.25)
    assert side_by_side.description == (
        "measured on this machine (cpu, 10.0 µs per operator), 25% slower per worker while 4 compute at once"
    )
    side_by_side.prepare([(8, 1)], concurrent=True)
    assert len(measured) == 1  # measured once


def test_measured_optimizer_step_is_timed_once_per_kind_and_threads(
    timed: List[Tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    updates: List[Tuple[str, int]] = []

    def time_update(kind: str, threads: int, device: torch.device) -> float:
        updates.append((kind, threads))
        return 3e-9 if kind == "optimizer" else 1e-9  # seconds per parameter

    monkeypatch.setattr(costs, "_time_update", time_update)
    measured = MeasuredCosts(KEY, "cpu", CPU)
    assert measured.description == "measured on this machine (cpu, 10.0 µs per operator)"
    assert measured.device_type == "cpu" and measured.link("cpu:0", "cpu:1") is None
    host, device = measured.update(1000, 130, "cpu:0", 1, "optimizer")
    assert host == pytest.approx(130 * 1e-5) and device == pytest.approx(3e-6)  # one SGD operator per tensor
    assert measured.update(2000, 130, "cpu:0", 1, "optimizer")[1] == pytest.approx(6e-6)  # per parameter
    host, device = measured.update(1000, 130, "cpu:0", 1, "accumulate")
    assert host == pytest.approx(3 * 1e-5) and device == pytest.approx(1e-6)  # batched: one add per 64 tensors
    assert updates == [("optimizer", 1), ("accumulate", 1)]


@pytest.mark.usefixtures("counted")
def test_host_time_is_the_measured_cost_per_operator_on_the_target_host_plus_the_launch() -> None:
    from gpipe_bench.predict.host import HostCosts

    measured = HostCosts(forward=2e-6, nograd=1e-6, backward=4e-6, cell_forward=8e-5, cell_backward=6e-5)
    gpu = HardwareCosts(KEY, GPU, host_costs=measured, host_speed=2.0)
    at_2 = gpu.layers(2, 1, "cuda:0")
    # conv: one forward, one backward operator; relu: two forward, one backward; fc: one and two
    per_f, per_b = 1e-6 + 1e-5, 2e-6 + 1e-5  # halved by the faster host, plus the launch
    assert _host(at_2) == [
        (pytest.approx(per_f), pytest.approx(per_b)),
        (pytest.approx(2 * per_f), pytest.approx(per_b)),
        (pytest.approx(per_f), pytest.approx(2 * per_b)),
    ]
    # without autograd the host records nothing: a no-grad forward costs its device time and the nograd host time
    conv = at_2[0]
    assert conv.nograd == pytest.approx((conv.forward + 0.5e-6 + 1e-5) / (conv.forward + per_f))
    assert gpu.cell_host() == (pytest.approx(4e-5), pytest.approx(3e-5))
    with pytest.raises(HarnessError, match="--host-speed 0"):
        HardwareCosts(KEY, GPU, host_speed=0)
