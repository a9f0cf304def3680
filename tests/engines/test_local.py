"""engines/local.py and engines/base.py: one interface over the plain model, our GPipe and torchgpipe."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, List, Optional, Tuple

import pytest
import torch
from torch import nn

from gpipe_bench import config, engines, models
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


# -- memory on virtual CPU devices, for models small enough to count by hand ---------------------------------------
#
# Batch 4 of 3x2x2 inputs (float32: 192 bytes) and int64 labels (32 bytes), 10 classes. A [4, n] float32
# activation is 16·n bytes. The meter counts every tensor storage the step makes, charged to the slot of
# the device whose worker made it; the caller's own work (labels, loss) goes to the last slot.

X_BYTES = 4 * 3 * 2 * 2 * 4
Y_BYTES = 4 * 8


def _linear(*args: Any, **kwargs: Any) -> nn.Sequential:
    """Stands in for the registry's builder: whatever model the row names, this one."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10))


def _two_linear(*args: Any, **kwargs: Any) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))


def _tiny_job(name: str, devices: list, chunks: int, balance: Optional[Tuple[int, ...]]) -> Job:
    row = replace(TABLE.row(name, "quick"), batch=4, chunks=chunks, balance=balance, checkpoint="never")
    return Job(TABLE, row, replace(SETTINGS, input_size=2), "quick", devices)


def _peaks(trainer: LocalTrainer, exclude_gradients: bool = True) -> List[int]:
    """One training step's peak per memory slot, parameter gradients (model state) left out as the memory rows do."""
    with trainer.watch_memory(copies=3) as watch:
        x, y = trainer.batch(watch)
        trainer.step(x, y)
        if exclude_gradients:
            watch.exclude([p.grad for p in trainer.parameters()])
        del x, y
    for p in trainer.parameters():
        p.grad = None
    return watch.peaks


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_plain_model_memory_is_what_its_tensors_hold_at_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flatten and Linear(12, 10): the peak comes in the loss's backward, while it holds the log-probabilities."""
    monkeypatch.setattr(models, "build", _linear)
    trainer = LocalTrainer(_tiny_job("naive-1", ["cpu"], 1, None))
    assert trainer.memory_devices() == ["cpu"] and trainer.model_bytes(3) == [3 * 4 * (12 * 10 + 10)]
    logits = 4 * 10 * 4
    # inputs, labels; log-probabilities, loss and its seed gradient, gradients of the log-probabilities and logits
    assert _peaks(trainer) == [X_BYTES + Y_BYTES + logits + 4 + 4 + logits + logits]
    # counted, the weight's and bias's gradients come once the log-probabilities are gone and set a higher peak
    assert _peaks(trainer, exclude_gradients=False) == [X_BYTES + Y_BYTES + 4 + 4 + logits + 10 * 12 * 4 + 10 * 4]


def test_each_virtual_device_is_charged_what_its_partition_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """naive-2: [Flatten, Linear(12, 16)] on cpu:0, [ReLU, Linear(16, 10)] on cpu:1, one micro-batch."""
    monkeypatch.setattr(models, "build", _two_linear)
    trainer = LocalTrainer(_tiny_job("naive-2", ["cpu:0", "cpu:1"], 1, (2, 2)))
    first, second = trainer.model.partitions
    assert trainer.memory_devices() == ["cpu:0", "cpu:1"] and [s for s, _ in trainer.memory_parts()] == [0, 1]
    assert trainer.model_bytes(3) == [3 * _parameter_bytes(first), 3 * _parameter_bytes(second)] == [2496, 2040]
    hidden, logits = 4 * 16 * 4, 4 * 10 * 4
    peaks = _peaks(trainer)
    # cpu:0: the inputs and its Linear's output (which cpu:1's ReLU reads)
    assert peaks[0] == X_BYTES + hidden
    # cpu:1, when its backward has made the gradient it hands back to cpu:0: the labels, the ReLU's output, the
    # logits, loss and seed, the logits' gradient, the ReLU output's gradient and the gradient of its own input
    assert peaks[1] == Y_BYTES + hidden + logits + 4 + 4 + logits + hidden + hidden
    # the parameter gradients are each partition's: counting them raises each slot by its own partition's bytes
    assert _peaks(trainer, exclude_gradients=False) == [
        peaks[0] + _parameter_bytes(first),
        peaks[1] + _parameter_bytes(second),
    ]


def test_partitions_on_one_device_share_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same split with both partitions on cpu:0: one slot, holding both partitions' bytes and models."""
    monkeypatch.setattr(models, "build", _two_linear)
    shared = LocalTrainer(_tiny_job("pipeline-2", ["cpu:0", "cpu:0"], 1, (2, 2)))
    split = LocalTrainer(_tiny_job("pipeline-2", ["cpu:0", "cpu:1"], 1, (2, 2)))
    assert shared.memory_devices() == ["cpu:0"] and [s for s, _ in shared.memory_parts()] == [0, 0]
    assert shared.model_bytes(3) == [sum(split.model_bytes(3))] == [4536]
    # one micro-batch runs the partitions one after the other: cpu:0's bytes are all still held at cpu:1's peak
    assert _peaks(shared) == [sum(_peaks(split))] == [448 + 1128]


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
    assert len(watch.peaks) == 1 and watch.peaks[0] > 0 and watch.allocated == []
    assert trainer.model_bytes(3) == [3 * 4 * sum(p.numel() for p in trainer.parameters())]


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


# -- precision -----------------------------------------------------------------------------------------------------


def test_a_bf16_row_steps_as_the_plain_model_under_the_same_autocast() -> None:
    """The trainer autocasts the forward and loss only; the split model gives the plain model's gradients."""
    small = config.plain_table("resnet14")  # 51 layers: seconds in bf16 on a CPU
    row = replace(small.row("naive-1", "quick"), batch=4, precision="bf16")
    settings = replace(small.profile("quick").settings, input_size=32)
    plain = LocalTrainer(Job(small, row, settings, "quick", ["cpu"]))
    # One micro-batch: BatchNorm sees the whole batch, as in the plain model.
    split_row = replace(row, name="pipeline-2", mode="pipeline", devices=2, balance=(20, 31))
    split = LocalTrainer(Job(small, split_row, settings, "quick", ["cpu:0", "cpu:1"]))
    x, y = plain.batch()
    plain.step(x, y)
    split.step(x, y)
    # As autocast would: parameters and their gradients stay fp32.
    for a, b in zip(plain.parameters(), split.parameters()):
        assert a.grad is not None and b.grad is not None and b.grad.dtype == torch.float32
        torch.testing.assert_close(b.grad, a.grad, rtol=1.6e-2, atol=1e-3)
    reference = LocalTrainer(Job(small, replace(row, precision="fp32"), settings, "quick", ["cpu"]))
    reference.step(x, y)
    assert any(not torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), reference.parameters()))  # type: ignore[arg-type]


def test_an_fp16_trainer_records_its_loss_scale_and_the_others_nothing() -> None:
    small = config.plain_table("resnet14")
    row = replace(small.row("naive-1", "quick"), batch=4)
    job = Job(small, row, replace(small.profile("quick").settings, input_size=32), "quick", ["cpu"])
    assert LocalTrainer(job).scaling_record() == {}
    trainer = LocalTrainer(replace(job, row=replace(job.row, precision="fp16")))  # resolve() refuses it on a CPU
    optimizer = torch.optim.SGD(trainer.parameters(), lr=0.1)
    trainer.step(*trainer.batch())  # torch's CPU autocast takes fp16 too
    trainer.optimizer_step(optimizer)
    assert trainer.scaling_record()["loss_scale"]["steps"] == 1
