"""Choosing the row a command names and overriding it (gpipe_bench.config.rows): validated as at load time."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Callable

import pytest

from gpipe_bench import config
from gpipe_bench.config import FLAGS, ConfigError, Overrides
from gpipe_bench.config.schema import Source


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
        (
            Overrides(chunks=8192),
            "--chunks 8192: more micro-batches than samples in the batch (4096); use --chunks 4096 or less",
        ),
        (
            Overrides(batch=32),
            "--batch-size 32: fewer samples than the row's 64 micro-batches (chunks); use --batch-size 64 or more, "
            "or --chunks 32 or less",
        ),
        (Overrides(balance=(100, 270)), "--balance 100,270: 2 partitions for 8 devices; give 8 entries"),
        (
            Overrides(balance=(1, 1, 1, 1, 1, 1, 1, 1)),
            "--balance 1,1,1,1,1,1,1,1: sums to 8 but resnet101(inplace=False) has 370 layers; make the entries sum to 370",
        ),
        (Overrides(batch=-1), "--batch-size -1: must be at least 1; write an integer >= 1"),
        (Overrides(chunks=1.5), "--chunks 1.5: not a whole number; write an integer >= 1"),  # type: ignore[arg-type]
        (
            Overrides(checkpoint="sometimes"),
            "--checkpoint sometimes: unknown value; use one of: always, except_last, never",
        ),
        (
            Overrides(skip_epochs=10),
            "--skip-epochs 10: not less than epochs (10): nothing would be measured; use --skip-epochs 9 or less, "
            "or --epochs 11 or more",
        ),
        (
            Overrides(epochs=1),
            "--epochs 1: not more than the warm-up epochs left out (skip_epochs 1): nothing would be measured; "
            "use --skip-epochs 0, or --epochs 2 or more",
        ),
        (
            Overrides(batch=99999),
            "--batch-size 99999: larger than dataset_size (50000): an epoch has no step; use --batch-size 50000 or less",
        ),
    ],
)
def test_a_value_a_flag_gave_is_named_by_the_flag(overrides: Overrides, expected: str) -> None:
    table = config.load("resnet101-speed")
    message = _error(
        lambda: config.apply(table, table.row("pipeline-8"), table.profile("published").settings, overrides)
    )
    assert message == expected  # the flag the user typed, no config file, no config key


def test_flags_map_every_override_and_a_caller_may_rename_or_drop_them() -> None:
    assert set(FLAGS) == {f.name for f in fields(Overrides)} - {"flags"}
    table = config.load("resnet101-speed")
    row, settings = table.row("pipeline-8"), table.profile("published").settings
    renamed = Overrides(batch=32, flags={"batch": "--batch"})  # plan's flag
    assert _error(lambda: config.apply(table, row, settings, renamed)).startswith("--batch 32: fewer samples")
    # a value no flag gave (an anchor's batch) is named by its key, in the file's form, tagged
    chosen = Overrides(batch=32, flags=dict.fromkeys(FLAGS, ""))
    assert _error(lambda: config.apply(table, row, settings, chosen)) == (
        f"{Source(table.path).short}: rows.pipeline-8.chunks = 64 (after overrides): more micro-batches than "
        "samples in the batch (32); use chunks <= 32"
    )


def test_a_value_the_file_gave_keeps_the_file_form_with_the_fix_as_flags() -> None:
    table = config.load("resnet101-speed")
    settings = replace(table.profile("published").settings, skip_epochs=10)
    message = _error(lambda: config.apply(table, table.row("pipeline-8"), settings, Overrides()))
    assert "resnet101-speed.yaml: settings.skip_epochs = 10 (after overrides)" in message
    assert message.endswith("use --skip-epochs 9 or less, or --epochs 11 or more")  # what the user can type


def test_naive_rows_refuse_pipeline_flags_by_name() -> None:
    table = config.load("resnet101-speed")
    naive, settings = table.row("naive-1"), table.profile("published").settings
    assert _error(lambda: config.apply(table, naive, settings, Overrides(chunks=4))) == (
        "--chunks 4: naive rows have no micro-batches; leave --chunks out (micro-batching is what pipeline rows do)"
    )
    assert _error(lambda: config.apply(table, naive, settings, Overrides(checkpoint="always"))).startswith(
        "--checkpoint always: naive rows run the plain model; leave --checkpoint out"
    )


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
