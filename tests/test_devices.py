"""Device resolution: parsing --devices, defaults, repeats, and errors that say what to fix."""

from __future__ import annotations

import pytest
import torch

from gpipe_bench import devices
from gpipe_bench.errors import HarnessError


def test_parse_forms() -> None:
    assert devices.parse("0,1") == ["cuda:0", "cuda:1"]
    assert devices.parse("cuda:0, cuda:0") == ["cuda:0", "cuda:0"]
    assert devices.parse("cpu:0,cpu:1") == ["cpu:0", "cpu:1"]
    assert devices.parse("cuda:0*3,cuda:1") == ["cuda:0"] * 3 + ["cuda:1"]
    assert devices.parse("cpu") == ["cpu"]


@pytest.mark.parametrize("spec", ["gpu:0", "cuda:x", "cpu:0*0", "cpu:0*two", ""])
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(HarnessError, match="is not a device"):
        devices.parse(spec)


def test_too_few_devices() -> None:
    with pytest.raises(HarnessError, match=r"2 device\(s\) given for 4 partitions; give 4"):
        devices.resolve("cpu:0,cpu:1", 4)


def test_extra_devices_ignored_and_repeats_noted() -> None:
    plan = devices.resolve("cpu:0,cpu:1,cpu:2", 2)
    assert plan.devices == ["cpu:0", "cpu:1"] and not plan.shared
    plan = devices.resolve("cpu:0*4", 4)
    assert plan.shared and "overhead" in plan.note


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only defaults")
def test_default_without_cuda_is_virtual_cpu() -> None:
    plan = devices.resolve(None, 3)
    assert plan.devices == ["cpu:0", "cpu:1", "cpu:2"] and plan.virtual_cpu
    assert "virtual CPU devices" in plan.note


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_asked_without_cuda() -> None:
    with pytest.raises(HarnessError, match="no CUDA device"):
        devices.resolve("cuda:0", 1)


def test_memory_slots_count_shared_devices_once() -> None:
    assert devices.memory_slots(["cpu:0", "cpu:1", "cpu:0"]) == (["cpu:0", "cpu:1"], [0, 1, 0])
    assert devices.memory_slots(["cuda", "cuda:0"]) == (["cuda:0"], [0, 0])
    # A launch's ranks are not devices of this process: one slot each (distributed memory rows).
    assert devices.memory_slots(["rank0", "rank1"]) == (["rank0", "rank1"], [0, 1])
