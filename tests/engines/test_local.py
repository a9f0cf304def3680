"""engines/local.py and engines/base.py: one interface over the plain model, our GPipe and torchgpipe."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gpipe_bench import config, engines
from gpipe_bench.engines.local import LocalTrainer
from gpipe_bench.errors import HarnessError
from gpipe_bench.jobs import Job
from gpipe_bench.pipe import GPipe

TABLE = config.load("resnet101-speed")
SETTINGS = replace(TABLE.profile("quick").settings, input_size=32)


def _job(name: str, devices: list, engine: str = "gpipe-bench") -> Job:
    row = replace(TABLE.row(name, "quick"), batch=4, chunks=2 if name.startswith("pipeline") else 1)
    return Job(TABLE, row, SETTINGS, "quick", devices, engine)


def test_plain_and_split_rows() -> None:
    plain = LocalTrainer(_job("naive-1", ["cpu"]))
    assert not isinstance(plain.model, GPipe) and plain.memory_devices() == ["cpu"]
    split = LocalTrainer(_job("pipeline-2", ["cpu:0", "cpu:1"]))
    assert isinstance(split.model, GPipe) and split.model.balance == [140, 230]
    assert split.memory_devices() == ["cpu:0", "cpu:1"] and [s for s, _ in split.memory_parts()] == [0, 1]
    x, y = split.batch()
    assert x is not None and y is not None and x.shape == (4, 3, 32, 32) and y.shape == (4,)
    split.step(x, y)
    assert all(p.grad is not None for p in split.parameters())


def test_torchgpipe_missing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(HarnessError, match="pip install -e '.\\[peers\\]'"):
        LocalTrainer(_job("pipeline-2", ["cpu:0", "cpu:1"], engine="torchgpipe"))


def test_allocation_failures_are_out_of_memory() -> None:
    assert engines.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert engines.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert engines.is_oom(MemoryError())
    assert not engines.is_oom(RuntimeError("shape mismatch"))


def test_cpu_memory_watch_charges_each_device() -> None:
    trainer = LocalTrainer(_job("pipeline-2", ["cpu:0", "cpu:1"]))
    with trainer.watch_memory(copies=3) as watch:
        x, y = trainer.batch(watch)
        trainer.step(x, y)
    assert len(watch.peaks) == 2 and all(p > 0 for p in watch.peaks)


def test_cuda_memory_watch_keeps_reserved_and_allocated_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each device's peak reserved (the published method) and peak allocated memory, both less its model memory."""
    reserved = {"cuda:0": 900 << 20, "cuda:1": 700 << 20}
    allocated = {"cuda:0": 500 << 20, "cuda:1": 600 << 20}
    monkeypatch.setattr(LocalTrainer, "memory_devices", lambda self: ["cuda:0", "cuda:1"])
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: reserved[device])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated[device])
    trainer = LocalTrainer(_job("pipeline-2", ["cpu:0", "cpu:1"]))
    with trainer.watch_memory(copies=3) as watch:
        x, y = trainer.batch(watch)
        trainer.step(x, y)
    model = trainer.model_bytes(3)
    assert watch.peaks == [reserved["cuda:0"] - model[0], reserved["cuda:1"] - model[1]]
    assert watch.allocated == [allocated["cuda:0"] - model[0], allocated["cuda:1"] - model[1]]


def test_cpu_memory_watch_has_one_figure() -> None:
    trainer = LocalTrainer(_job("naive-1", ["cpu"]))
    with trainer.watch_memory(copies=3) as watch:
        x, y = trainer.batch(watch)
        trainer.step(x, y)
    assert len(watch.peaks) == 1 and watch.allocated == []


@pytest.mark.cuda
@pytest.mark.timeout(120)
def test_cuda_memory_watch_on_a_gpu() -> None:
    """The allocated peak is what tensors took: never above the reserved one, which holds it in segments."""
    trainer = LocalTrainer(_job("naive-1", ["cuda:0"]))
    try:
        with trainer.watch_memory(copies=3) as watch:
            x, y = trainer.batch(watch)
            trainer.step(x, y)
        assert len(watch.peaks) == len(watch.allocated) == 1
        assert watch.peaks[0] >= watch.allocated[0] > 0
    finally:
        trainer.close()
