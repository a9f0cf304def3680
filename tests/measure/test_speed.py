"""measure/speed.py: the one speed loop, end to end on a real row, how Ctrl-C ends it, and where a timeline is recorded."""

from __future__ import annotations

import gc
import json
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, List

import pytest
import torch
from click.testing import CliRunner

from gpipe_bench import config
from gpipe_bench.cli import main
from gpipe_bench.engines.local import LocalTrainer
from gpipe_bench.errors import HarnessError
from gpipe_bench.jobs import Job
from gpipe_bench.measure import speed
from gpipe_bench.timeline.model import Timeline
from helpers import tiny_configs

TABLE = config.load("resnet101-speed")
QUICK = TABLE.profile("quick")


def _job(name: str, epochs: int = 3, skip: int = 1, **row_changes: Any) -> Job:
    row = replace(TABLE.row(name, "quick"), **row_changes)
    settings = replace(QUICK.settings, epochs=epochs, skip_epochs=skip, dataset_size=16, input_size=32)
    count = len(row.balance) if row.balance else 1
    return Job(TABLE, row, settings, "quick", [f"cpu:{k}" for k in range(count)])


@pytest.mark.slow
def test_a_row_measures_every_epoch_after_the_warm_up() -> None:
    steps = []
    result = speed.run(_job("pipeline-2", batch=8, chunks=2), lambda *args: steps.append(args))
    assert result is not None and result.status == "ok"
    assert (result.table, result.experiment, result.profile, result.engine, result.kind) == (
        "resnet101-speed",
        "pipeline-2",
        "quick",
        "gpipe-bench",
        "speed",
    )
    assert len(result.samples) == 2 and all(s > 0 for s in result.samples)  # 3 epochs, 1 of warm-up
    assert result.value == pytest.approx(sum(result.samples) / 2)
    assert set(result.spread) == {"min", "max", "median", "std"}
    assert result.spread["min"] <= result.value <= result.spread["max"]
    assert result.settings["balance"] == [140, 230] and result.settings["devices"] == ["cpu:0", "cpu:1"]
    assert result.settings["batch"] == 8 and result.settings["chunks"] == 2 and result.settings["epochs"] == 3
    assert result.environment["devices"] == ["cpu:0", "cpu:1"] and result.created.endswith("+00:00")
    assert [s[:3] for s in steps] == [(e, k, 2) for e in range(3) for k in range(1, 3)]  # 16 / 8 = 2 steps an epoch
    json.dumps(result.to_json())


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    real = LocalTrainer.step
    count = {"n": 0}

    def step(self: LocalTrainer, x: Any, y: Any) -> None:
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        real(self, x, y)

    monkeypatch.setattr(LocalTrainer, "step", step)


@pytest.mark.parametrize("calls, finished", [(1, 0), (2 * 2 + 1, 2)])
def test_ctrl_c_says_how_many_epochs_finished(monkeypatch: pytest.MonkeyPatch, calls: int, finished: int) -> None:
    """Interrupted in the warm-up epoch, it reported one epoch finished: the warm-up was counted as done."""
    _interrupt_after(monkeypatch, calls)
    with pytest.raises(speed.Interrupted) as caught:
        speed.run(_job("naive-1", batch=8))
    assert caught.value.completed_epochs == finished


def test_cli_interrupt_writes_nothing_and_says_how_far(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _interrupt_after(monkeypatch, 4)  # tiny quick naive-1: 16 / 8 = 2 steps an epoch; the third epoch is cut
    monkeypatch.setenv("GPIPE_BENCH_CONFIGS", tiny_configs(tmp_path / "cfg"))
    result = CliRunner().invoke(
        main,
        ["speed", "resnet101", "--experiment", "naive-1", "--profile", "quick", "--devices", "cpu"]
        + ["--output", str(tmp_path / "out"), "--quiet"],
    )
    assert result.exit_code == 130, result.output
    assert (
        "Interrupted in naive-1 after 2 of 3 epochs; nothing written for it (0 earlier row(s) saved)." in result.output
    )
    assert not list(tmp_path.rglob("*.json"))


def test_out_of_memory_is_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(self: LocalTrainer, x: Any, y: Any) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes")

    monkeypatch.setattr(LocalTrainer, "step", oom)
    result = speed.run(_job("naive-1", batch=8))
    assert result is not None and result.status == "oom" and result.value is None and result.samples == []


def test_an_out_of_memory_row_frees_its_activations_before_the_next_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a failed step left in reference cycles is collected when the row ends, after the trainer is closed."""
    held: List[Any] = []
    events: List[str] = []

    def oom(self: LocalTrainer, x: Any, y: Any) -> None:
        activations: List[Any] = [torch.ones(1024)]
        activations.append(activations)  # a cycle: freed only by a collection
        held.append(weakref.ref(activations[0]))
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    collect, close = gc.collect, LocalTrainer.close

    def closing(self: LocalTrainer) -> None:
        events.append("close")
        close(self)

    def collecting(*args: Any) -> int:
        events.append("collect")
        return collect(*args)

    monkeypatch.setattr(LocalTrainer, "step", oom)
    monkeypatch.setattr(LocalTrainer, "close", closing)
    monkeypatch.setattr(gc, "collect", collecting)
    gc.disable()  # no automatic collection in between: only the row's own frees the cycle
    try:
        result = speed.run(_job("naive-1", batch=8))
        assert held and held[0]() is None
    finally:
        gc.enable()
    assert result is not None and result.status == "oom"
    assert events[-2:] == ["close", "collect"]


@pytest.mark.parametrize("skip", [1, 0])
def test_a_timeline_is_one_extra_step_after_the_warm_up(skip: int) -> None:
    """Recorded between the warm-up (or the first epoch, when there is none) and the next epoch, never inside one."""
    seen: List[Any] = []
    result = speed.run(
        _job("naive-1", epochs=2, skip=skip, batch=8),
        lambda epoch, step, steps, rate: seen.append((epoch, step)),
        lambda timeline: seen.append(timeline),
    )
    assert result is not None and len(result.samples) == 2 - skip
    assert [type(x) for x in seen] == [tuple, tuple, Timeline, tuple, tuple]  # 2 steps an epoch
    timeline = seen[2]
    assert timeline.lanes == ["cpu:0", "host"] and timeline.meta["row"] == "naive-1"
    assert sorted(s.name for s in timeline.spans) == ["B0", "F0", "loss", "optimizer", "zero_grad"]


def test_rows_that_cannot_be_recorded_are_refused_before_they_run() -> None:
    speed.check_timeline("gpipe-bench", [_job("pipeline-2"), _job("naive-1")])
    speed.check_timeline("torchgpipe", [replace(_job("naive-1"), engine="torchgpipe")])  # the plain model
    with pytest.raises(HarnessError, match="pipeline-2 on --engine torchgpipe") as caught:
        speed.check_timeline("torchgpipe", [replace(_job("pipeline-2"), engine="torchgpipe")])
    assert caught.value.param == "--timeline"
    with pytest.raises(HarnessError, match="--engine distributed"):
        speed.check_timeline("distributed")
    with pytest.raises(HarnessError, match="torchgpipe"):
        speed.run(replace(_job("pipeline-2"), engine="torchgpipe"), timeline=lambda t: None)
