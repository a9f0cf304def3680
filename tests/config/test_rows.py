"""Choosing the row a command names and overriding it (gpipe_bench.config.rows): validated as at load time."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, List

import pytest

from gpipe_bench import config
from gpipe_bench.config import ConfigError, Overrides


def _error(call: Callable[[], Any]) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = info.value.message
    assert "\n" not in message
    return message


def test_unknown_row_and_profile() -> None:
    table = config.load("resnet101-speed")
    message = _error(lambda: table.row("pipeline-16"))
    assert (
        "resnet101-speed.yaml" in message
        and "rows = 'pipeline-16'" in message
        and "naive-1, naive-2, pipeline-1" in message
    )
    message = _error(lambda: table.profile("slow"))
    assert "profiles = 'slow'" in message and "published, quick" in message


def test_find_row() -> None:
    table = config.load("resnet101-speed")
    assert config.find_row(table, pipeline=8).name == "pipeline-8"
    assert config.find_row(table, naive=1).name == "naive-1"
    assert config.find_row(table, experiment="pipeline-2").chunks == 256
    assert config.find_row(table, pipeline=8, profile="quick").batch == 64
    assert config.find_row(config.load("amoebanetd-speed"), naive=2).balance == (84, 241)


def test_find_row_errors_name_the_available_rows() -> None:
    table = config.load("resnet101-speed")
    message = _error(lambda: config.find_row(table, pipeline=16))
    assert "--pipeline = 16" in message and "no pipeline row over 16 device(s)" in message
    assert "use one of --naive 1/2, --pipeline 1/2/4/8, --experiment NAME" in message
    assert "(rows: naive-1, naive-2, pipeline-1, pipeline-2, pipeline-2-planned, pipeline-4, pipeline-8)" in message
    assert "--naive 1/2" in _error(lambda: config.find_row(table, naive=4))
    assert "'pipeline-3'" in _error(lambda: config.find_row(table, experiment="pipeline-3"))
    assert "exactly one" in _error(lambda: config.find_row(table))
    assert "exactly one" in _error(lambda: config.find_row(table, pipeline=8, naive=1))
    accuracy = config.load("resnet101-accuracy")
    message = _error(lambda: config.find_row(accuracy, pipeline=8))
    assert (
        "several pipeline rows over 8 devices (pipeline-1k, pipeline-4k)" in message and "--experiment NAME" in message
    )


def test_apply_overrides() -> None:
    table = config.load("resnet101-speed")
    row, settings = table.row("pipeline-8"), table.profile("published").settings
    new_row, new_settings = config.apply(table, row, settings, Overrides(batch=512, chunks=32, epochs=3, skip_epochs=2))
    assert (new_row.batch, new_row.chunks, new_row.balance) == (512, 32, row.balance)
    assert (new_settings.epochs, new_settings.skip_epochs, new_settings.input_size) == (3, 2, 224)
    same_row, same_settings = config.apply(table, row, settings, Overrides())
    assert (same_row, same_settings) == (row, settings)
    balanced, _ = config.apply(
        table, row, settings, Overrides(balance=(46, 46, 46, 46, 46, 46, 46, 48), checkpoint="always")
    )
    assert balanced.balance == (46, 46, 46, 46, 46, 46, 46, 48) and balanced.checkpoint == "always"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (Overrides(chunks=8192), ["rows.pipeline-8.chunks = 8192", "batch (4096)"]),
        (Overrides(batch=32), ["rows.pipeline-8.chunks = 64", "batch (32)", "use chunks <= 32"]),
        (Overrides(balance=(100, 270)), ["rows.pipeline-8.balance", "2 partitions for 8 devices"]),
        (Overrides(balance=(1, 1, 1, 1, 1, 1, 1, 1)), ["sums to 8", "370 layers"]),
        (Overrides(batch=-1), ["rows.pipeline-8.batch = -1", "at least 1"]),
        (Overrides(chunks=1.5), ["rows.pipeline-8.chunks = 1.5", "whole number"]),  # type: ignore[arg-type]
        (Overrides(checkpoint="sometimes"), ["checkpoint = 'sometimes'", "always, except_last, never"]),
        (Overrides(skip_epochs=10), ["settings.skip_epochs = 10", "epochs (10)"]),
        (Overrides(epochs=1), ["settings.skip_epochs = 1", "epochs (1)"]),
    ],
)
def test_apply_validates_like_load(overrides: Overrides, expected: List[str]) -> None:
    table = config.load("resnet101-speed")
    message = _error(
        lambda: config.apply(table, table.row("pipeline-8"), table.profile("published").settings, overrides)
    )
    assert "resnet101-speed.yaml" in message and "(after overrides)" in message
    for text in expected:
        assert text in message, (text, message)


def test_apply_to_naive_and_memory_rows() -> None:
    speed = config.load("resnet101-speed")
    naive = speed.row("naive-1")
    assert "no micro-batches" in _error(
        lambda: config.apply(speed, naive, speed.profile("published").settings, Overrides(chunks=4))
    )
    memory = config.load("amoebanetd-memory")
    row, _ = config.apply(
        memory, memory.row("pipeline-2", "quick"), memory.profile("quick").settings, Overrides(chunks=4)
    )
    assert row.chunks == 4 and row.balance == (107, 38)
    row, _ = config.apply(
        memory,
        replace(memory.row("pipeline-2", "quick"), balance=None),
        memory.profile("quick").settings,
        Overrides(chunks=4),
    )
    assert row.balance is None  # memory rows may leave it to balance_by_size


def test_pipeline_n_names_the_published_row_not_the_planned_one() -> None:
    table = config.load("resnet101-speed")
    assert config.find_row(table, pipeline=2, profile="quick").name == "pipeline-2"
    assert config.find_row(table, experiment="pipeline-2-planned", profile="quick").planned


def test_a_balance_given_replaces_the_planned_one() -> None:
    table = config.load("resnet101-speed")
    quick = table.profile("quick")
    row = table.row("pipeline-2-planned", "quick")
    given, _ = config.apply(table, row, quick.settings, Overrides(balance=(100, 270)))
    assert given.balance == (100, 270) and not given.planned
    kept, _ = config.apply(table, row, quick.settings, Overrides(chunks=8))
    assert kept.planned and kept.balance is None and kept.chunks == 8


def _overridden(table: Any, name: str, overrides: Overrides, profile: str = "quick") -> Any:
    chosen = table.profile(profile)
    row = table.row(name, profile)
    ran = config.apply(table, row, chosen.settings, overrides, model=chosen.model)
    return config.overridden(table.kind, (row, chosen.settings), ran)


def test_overridden_names_what_a_run_changed_of_its_row() -> None:
    table = config.load("resnet101-speed")  # quick pipeline-2: batch 64, chunks 4, balance 140,230, except_last
    changed = _overridden(table, "pipeline-2", Overrides(batch=64, chunks=4, balance=(192, 178), checkpoint="never"))
    assert changed == {"balance": [192, 178], "checkpoint": "never"}  # batch and chunks restated: not changes
    restated = Overrides(batch=64, chunks=4, balance=(140, 230), checkpoint="except_last", epochs=2, precision="fp32")
    assert _overridden(table, "pipeline-2", restated) == {}  # a speed figure is per epoch; precision has a suffix


def test_a_planned_or_found_balance_is_the_rows_own_until_one_is_given() -> None:
    speed = config.load("resnet101-speed")
    assert _overridden(speed, "pipeline-2-planned", Overrides()) == {}
    assert _overridden(speed, "pipeline-2-planned", Overrides(balance=(185, 185))) == {"balance": [185, 185]}
    memory = config.load("amoebanetd-memory")
    found = replace(memory.row("pipeline-2"), balance=None)
    settings = memory.profile("published").settings
    ran = config.apply(memory, found, settings, Overrides())
    assert config.overridden("memory", (found, settings), ran) == {}


def test_an_accuracy_rows_epochs_are_part_of_its_name() -> None:
    table = config.load("resnet101-accuracy")
    epochs = table.profile("quick").settings.epochs
    assert _overridden(table, "pipeline-256", Overrides(epochs=epochs + 1)) == {"epochs": epochs + 1}
    assert _overridden(table, "pipeline-256", Overrides(epochs=epochs)) == {}
