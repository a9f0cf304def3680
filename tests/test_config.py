"""The table configs load, hold the published rows exactly, and every user mistake is one clear line.

Loading a whole table (gpipe_bench.config.loader with the layout, rules and kinds it checks);
choosing and overriding rows is tests/config/test_rows.py, the typed kind settings tests/config/test_kinds.py.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import yaml

from gpipe_bench import config, models
from gpipe_bench.config import ConfigError, rules
from gpipe_bench.errors import HarnessError

TABLES = ["amoebanetd-memory", "amoebanetd-speed", "resnet101-accuracy", "resnet101-speed"]


def _length(model: str, **args: Any) -> int:
    return models.count(model, **args)[0]


def _chunk_sizes(batch: int, chunks: int) -> List[int]:
    """Micro-batch sizes as torch.chunk makes them."""
    size = math.ceil(batch / chunks)
    return [min(size, batch - start) for start in range(0, batch, size)]


# -- the shipped configs -------------------------------------------------------------------------


def test_table_names() -> None:
    assert config.table_names() == TABLES


@pytest.mark.parametrize("name", TABLES)
def test_configs_load_with_published_and_quick(name: str) -> None:
    table = config.load(name)
    assert table.name == name and Path(table.path).name == f"{name}.yaml"
    assert set(table.profiles) == {"published", "quick"}
    published, quick = table.profile("published"), table.profile("quick")
    assert published.rows == tuple(r for r in published.rows)  # a tuple
    assert table.baseline in [r.name for r in published.rows]
    assert 0 < table.tolerance <= 0.2
    assert {"hardware", "software", "reference"} <= set(table.source)
    assert "not comparable" in quick.description
    # quick keeps every row's shape: names, modes, devices, checkpoint modes, published values
    shape = lambda r: (r.name, r.mode, r.devices, r.checkpoint, r.published)  # noqa: E731
    assert [shape(r) for r in quick.rows] == [shape(r) for r in published.rows]


@pytest.mark.parametrize("name", TABLES)
@pytest.mark.parametrize("profile", ["published", "quick"])
def test_balances_sum_to_model_length(name: str, profile: str) -> None:
    table = config.load(name)
    chosen = table.profile(profile)
    for row in chosen.rows:
        if row.balance is not None:
            assert len(row.balance) == row.devices
            length = _length(chosen.model or table.model, **row.model_args, num_classes=chosen.settings.classes)
            assert sum(row.balance) == length, (name, profile, row.name)


def chosen_model(table: config.Table, profile: str) -> str:
    return table.profile(profile).model or table.model


def test_known_model_lengths() -> None:
    assert _length("resnet101") == 370
    for layers in (1, 4, 6):
        assert _length("amoebanetd", num_layers=layers, num_filters=24) == 60 * layers + 85


@pytest.mark.parametrize("name", TABLES)
def test_quick_profile_fits_a_small_cpu(name: str) -> None:
    table = config.load(name)
    quick, published = table.profile("quick"), table.profile("published")
    s = quick.settings
    assert s.input_size <= 64
    if table.kind == "accuracy":  # a small model of the family, one pass over a real dataset: minutes a row
        params = models.count(chosen_model(table, "quick"), **quick.rows[0].model_args)[1]
        assert params <= 250_000 and s.dataset_size * s.epochs <= 60_000
    else:
        assert s.dataset_size <= 512
    assert s.epochs <= 3 and s.skip_epochs < s.epochs
    for row, pub in zip(quick.rows, published.rows):
        assert row.batch <= pub.batch and row.chunks <= row.batch <= s.dataset_size
        assert min(_chunk_sizes(row.batch, row.chunks)) >= 2, row.name  # BatchNorm needs 2 samples
        if table.kind == "memory":  # lengths change with L: recorded from balance_by_size (tests/bench/test_memory.py)
            assert row.balance is None or len(row.balance) == row.devices
        elif chosen_model(table, "quick") != table.model:  # a smaller model: the balance scaled to its length
            assert row.balance is None or len(row.balance) == len(pub.balance or ())
        else:
            assert row.balance == pub.balance


def test_resnet101_speed_published_rows() -> None:
    table = config.load("resnet101-speed")
    assert (table.kind, table.metric, table.unit, table.higher_is_better, table.baseline) == (
        "speed",
        "throughput",
        "samples/sec",
        True,
        "naive-1",
    )
    s = table.profile("published").settings
    assert (s.input_size, s.dataset_size, s.epochs, s.skip_epochs, s.classes) == (224, 50000, 10, 1, 10)
    assert s.optimizer == {"name": "sgd", "lr": 0.1}
    naive = table.row("naive-1")
    assert (naive.mode, naive.devices, naive.batch, naive.chunks, naive.balance) == ("naive", 1, 96, 1, None)
    assert naive.published.values == {"throughput": 92.539, "speedup": 1.0}
    p1 = table.row("pipeline-1")
    assert (p1.balance, p1.checkpoint, p1.published.values["speedup"]) == ((370,), "always", 0.756)
    p8 = table.row("pipeline-8")
    assert (p8.batch, p8.chunks, p8.checkpoint) == (4096, 64, "except_last")
    assert p8.balance == (26, 22, 33, 44, 44, 66, 66, 69)
    assert p8.published.values == {"throughput": 404.084, "speedup": 4.367}
    assert table.row("pipeline-4").balance == (47, 96, 118, 109)
    assert table.row("pipeline-2").published.values["throughput"] == 137.788


def test_amoebanetd_speed_published_rows() -> None:
    table = config.load("amoebanetd-speed")
    assert table.model_args == {"num_layers": 4, "num_filters": 512} and table.baseline == "naive-2"
    naive = table.row("naive-2")
    assert (naive.batch, naive.chunks, naive.balance, naive.checkpoint) == (47, 1, (84, 241), "never")
    p2 = table.row("pipeline-2")
    assert (p2.batch, p2.chunks, p2.balance) == (803, 48, (144, 181))
    p8 = table.row("pipeline-8")
    assert (p8.batch, p8.chunks) == (216, 32) and len(_chunk_sizes(216, 32)) == 31
    assert "31 micro-batches" in p8.note
    published = [r for r in table.profile("published").rows if not r.planned]
    rerun = [r.published.values["throughput_pytorch_1_3"] for r in published]
    assert rerun == [13.884, 20.334, 30.893, 42.263]
    assert [r.published.values["speedup"] for r in published] == [1.0, 1.434, 2.049, 2.424]
    quick = table.row("pipeline-8", "quick")
    assert quick.model_args["num_layers"] == 4 and quick.model_args["num_filters"] < 512


def test_amoebanetd_memory_published_rows() -> None:
    table = config.load("amoebanetd-memory")
    assert (table.kind, table.higher_is_better) == ("memory", False)
    rows = table.profile("published").rows
    assert [(r.model_args["num_layers"], r.model_args["num_filters"]) for r in rows] == [
        (6, 208),
        (6, 416),
        (6, 544),
        (12, 544),
        (24, 512),
    ]
    assert [r.published.values["parameters"] for r in rows] == ["90M", "358M", "613M", "1.16B", "2.01B"]
    assert [r.published.values["model_memory_gb"] for r in rows] == [1.00, 4.01, 6.45, 13.00, 22.42]
    assert [r.published.values["peak_activation_gb"] for r in rows] == [None, 6.64, 11.31, 18.72, 35.78]
    assert rows[0].balance is None and [r.devices for r in rows] == [1, 1, 2, 4, 8]
    assert [r.balance for r in rows[1:]] == [
        (445,),
        (341, 104),
        (451, 165, 91, 98),
        (545, 311, 211, 93, 88, 93, 87, 97),
    ]
    assert all((r.batch, r.chunks) == (128, 128) for r in rows[1:])
    assert "slip" in table.row("pipeline-2").note
    s = table.profile("published").settings
    assert s.optimizer["name"] == "rmsprop" and s.extra["steps"] == 2 and s.extra["parameter_copies"] == 3
    lengths = [_length("amoebanetd", **r.model_args) for r in table.profile("quick").rows]
    assert lengths == sorted(lengths) and lengths[-1] < 445  # quick: smaller models, same growth


def test_resnet101_accuracy_published_rows() -> None:
    table = config.load("resnet101-accuracy")
    rows = {r.name: r for r in table.profile("published").rows}
    assert rows["dataparallel-256"].published.values == {"top1_error": 22.02, "top1_error_std": 0.11}
    assert rows["pipeline-1k"].published.values == {"top1_error": 22.24, "top1_error_std": 0.19}
    assert (rows["dataparallel-1k"].mode, rows["dataparallel-1k"].devices, rows["dataparallel-1k"].balance) == (
        "dataparallel",
        4,
        None,
    )
    assert (rows["pipeline-256"].chunks, rows["pipeline-256"].balance) == (4, (140, 230))
    assert rows["pipeline-4k"].balance == rows["pipeline-1k"].balance and rows["pipeline-4k"].batch == 4096
    s = table.profile("published").settings
    assert (s.epochs, s.classes) == (90, 1000)
    assert s.optimizer == {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0001}
    assert (s.extra["lr_scale_batch"], s.extra["warmup_epochs"], s.extra["lr_milestones"]) == (256, 4, [30, 60, 80])
    assert s.extra["reference"]["top1_error"] == 22.08
    quick = table.profile("quick").settings
    assert quick.extra["lr_milestones"] == [0.6, 0.85] and quick.extra["warmup_step"] == "iteration"  # merged
    assert config.AccuracySettings.of(table, quick).train_transforms == ("horizontal_flip", "normalize")
    assert config.AccuracySettings.of(table, s).train_transforms == (
        "random_resized_crop",
        "horizontal_flip",
        "normalize",
    )
    assert config.AccuracySettings().train_transforms == ("random_crop", "horizontal_flip", "normalize")


# -- bad configs: one line naming file, key, value and the fix -----------------------------------

Mutation = Callable[[Dict[str, Any]], None]


def _write(tmp_path: Path, mutate: Mutation, name: str = "resnet101-speed") -> Path:
    data = yaml.safe_load((config.config_dir() / f"{name}.yaml").read_text())
    mutate(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _error(call: Callable[[], Any]) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = info.value.message
    assert "\n" not in message and isinstance(info.value, HarnessError)
    return message


def _set(*keys: Any, value: Any) -> Mutation:
    def mutate(data: Dict[str, Any]) -> None:
        target = data
        for key in keys[:-1]:
            target = next(r for r in target if r["name"] == key) if isinstance(target, list) else target[key]
        target[keys[-1]] = value

    return mutate


BAD = {
    "unknown model": (_set("model", value="resnet102"), ["model", "'resnet102'", "resnet101"]),
    "balance sum": (
        _set("rows", "pipeline-2", "balance", value=[140, 231]),
        ["rows.pipeline-2.balance", "[140, 231]", "sums to 371", "370 layers"],
    ),
    "balance length": (
        _set("rows", "pipeline-2", "balance", value=[370]),
        ["rows.pipeline-2.balance", "1 partitions for 2 devices"],
    ),
    "negative batch": (_set("rows", "pipeline-8", "batch", value=-4), ["rows.pipeline-8.batch", "-4", "at least 1"]),
    "float chunks": (
        _set("rows", "pipeline-8", "chunks", value=2.5),
        ["rows.pipeline-8.chunks", "2.5", "whole number"],
    ),
    "string devices": (
        _set("rows", "pipeline-8", "devices", value="8"),
        ["rows.pipeline-8.devices", "'8'", "whole number"],
    ),
    "planned naive row": (
        _set("rows", "naive-2", "balance", value="planned"),
        ["rows.naive-2.balance", "'planned'", "only pipeline rows of speed tables are planned"],
    ),
    "balance a word": (
        _set("rows", "pipeline-2", "balance", value="auto"),
        ["rows.pipeline-2.balance", "'auto'", "planned"],
    ),
    "zero balance entry": (
        _set("rows", "pipeline-2", "balance", value=[0, 370]),
        ["rows.pipeline-2.balance[0]", "= 0"],
    ),
    "chunks > batch": (
        _set("rows", "pipeline-8", "chunks", value=8192),
        ["rows.pipeline-8.chunks", "8192", "batch (4096)"],
    ),
    "checkpoint mode": (
        _set("rows", "pipeline-8", "checkpoint", value="sometimes"),
        ["rows.pipeline-8.checkpoint", "'sometimes'", "always, except_last, never"],
    ),
    "mode": (
        _set("rows", "pipeline-8", "mode", value="pipelined"),
        ["rows.pipeline-8.mode", "naive, pipeline, dataparallel"],
    ),
    "row key typo": (
        _set("rows", "pipeline-8", "chunk", value=64),
        ["rows.pipeline-8.chunk", "unknown key 'chunk'", "did you mean 'chunks'", "allowed keys: name, mode"],
    ),
    "top key typo": (_set("baseilne", value="naive-1"), ["baseilne", "did you mean 'baseline'", "allowed keys"]),
    "settings typo": (_set("settings", "epoch", value=3), ["settings.epoch", "did you mean 'epochs'"]),
    "missing key": (lambda d: d.pop("metric"), ["metric = (missing)", "add `metric:`"]),
    "baseline": (_set("baseline", value="naive-9"), ["baseline", "'naive-9'", "naive-1, naive-2, pipeline-1"]),
    "skip_epochs": (_set("settings", "skip_epochs", value=10), ["settings.skip_epochs", "= 10", "epochs (10)"]),
    "quick skip_epochs": (
        _set("profiles", "quick", "settings", "skip_epochs", value=3),
        ["profiles.quick.settings.skip_epochs", "= 3", "epochs (3)"],
    ),
    "quick row typo": (
        _set("profiles", "quick", "rows", "pipeline-9", value={"batch": 8}),
        ["profiles.quick.rows.pipeline-9", "no such row"],
    ),
    "quick balance": (
        _set("profiles", "quick", "rows", "pipeline-2", value={"batch": 64, "chunks": 16, "balance": [1, 2]}),
        ["profiles.quick.rows.pipeline-2.balance", "sums to 3", "370 layers"],
    ),
    "quick structure": (
        _set("profiles", "quick", "rows", "pipeline-2", value={"devices": 4}),
        ["profiles.quick.rows.pipeline-2.devices", "unknown key", "batch, chunks, balance"],
    ),
    "missing quick": (lambda d: d["profiles"].pop("quick"), ["profiles.quick", "(missing)"]),
    "null balance": (
        _set("rows", "pipeline-2", "balance", value=None),
        ["rows.pipeline-2.balance = null", "only memory tables"],
    ),
    "naive chunks": (_set("rows", "naive-1", "chunks", value=4), ["rows.naive-1.chunks", "no micro-batches"]),
    "duplicate row": (lambda d: d["rows"].append(copy.deepcopy(d["rows"][0])), ["rows.naive-1.name", "second row"]),
    "num_classes": (_set("model_args", value={"num_classes": 1000}), ["model_args.num_classes", "settings.classes"]),
    "model rejects": (_set("model_args", value={"depth": 50}), ["rows.naive-1.model_args", "rejects"]),
    "tolerance": (_set("compare", "tolerance", value="ten percent"), ["compare.tolerance", "'ten percent'"]),
    "kind": (_set("kind", value="latency"), ["kind", "'latency'", "speed, memory, accuracy"]),
    "name": (_set("name", value="resnet-speed"), ["name", "'resnet-speed'", "write name: resnet101-speed"]),
    "batch > dataset": (
        _set("settings", "dataset_size", value=1000),
        ["rows.pipeline-2.batch", "4096", "dataset_size (1000)"],
    ),
    "optimizer name": (_set("settings", "optimizer", value={"lr": 0.1}), ["settings.optimizer.name", "(missing)"]),
    "precision": (
        _set("rows", "pipeline-2", "precision", value="fp8"),
        ["rows.pipeline-2.precision", "'fp8'", "fp32, tf32, bf16, fp16"],
    ),
    "quick precision": (
        _set("profiles", "quick", "rows", "pipeline-2", value={"precision": "half"}),
        ["profiles.quick.rows.pipeline-2.precision", "'half'", "fp32, tf32, bf16, fp16"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_one_line_naming_file_key_value(tmp_path: Path, case: str) -> None:
    mutate, expected = BAD[case]
    path = _write(tmp_path, mutate)
    message = _error(lambda: config.load(str(path)))
    assert path.name in message
    for text in expected:
        assert text in message, (case, text, message)


def test_a_row_or_a_profiles_row_may_set_its_precision(tmp_path: Path) -> None:
    def mutate(data: Dict[str, Any]) -> None:
        _set("rows", "pipeline-2", "precision", value="fp16")(data)
        data["profiles"]["quick"]["rows"]["pipeline-2"]["precision"] = "bf16"

    table = config.load(str(_write(tmp_path, mutate)))
    assert table.row("pipeline-2").precision == "fp16" and table.row("pipeline-2", "quick").precision == "bf16"
    assert table.row("pipeline-4", "quick").precision == "fp32"


def test_memory_tables_alone_may_leave_balance_null(tmp_path: Path) -> None:
    def mutate(data: Dict[str, Any]) -> None:
        data["rows"][-1]["balance"] = None

    table = config.load(str(_write(tmp_path, mutate, "amoebanetd-memory")))
    assert table.row("pipeline-8").balance is None


def test_bad_amoebanetd_balance(tmp_path: Path) -> None:

    def mutate(data: Dict[str, Any]) -> None:
        data["rows"][-1]["balance"] = [40, 35, 36, 38, 43, 45, 46, 39]

    message = _error(lambda: config.load(str(_write(tmp_path, mutate, "amoebanetd-speed"))))
    assert "rows.pipeline-8.balance" in message and "sums to 322" in message and "325 layers" in message


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ntitle: Broken\nrows:\n  - name: a\n    batch: [1, 2\n  - name: b\n")
    message = _error(lambda: config.load(str(path)))
    assert "broken.yaml" in message and "malformed YAML" in message and "line 6" in message


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    text = (
        (config.config_dir() / "resnet101-speed.yaml")
        .read_text()
        .replace("  epochs: 10\n", "  epochs: 10\n  epochs: 12\n")
    )
    path = tmp_path / "resnet101-speed.yaml"
    path.write_text(text)
    message = _error(lambda: config.load(str(path)))
    assert "duplicate key 'epochs'" in message and "line" in message


def test_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert "not a mapping" in _error(lambda: config.load(str(path)))


def test_unknown_table_names_the_known_ones() -> None:
    message = _error(lambda: config.load("resnet50-speed"))
    assert "'resnet50-speed'" in message and "resnet101-speed" in message
    assert "missing.yaml" in _error(lambda: config.load("/nonexistent/missing.yaml"))


def test_config_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, lambda d: None)
    monkeypatch.setenv("GPIPE_BENCH_CONFIGS", str(tmp_path))
    assert config.config_dir() == tmp_path and config.table_names() == ["resnet101-speed"]
    assert config.load("resnet101-speed").path == str((tmp_path / "resnet101-speed.yaml").resolve())


def test_configs_ship_inside_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/ sat beside the package: a wheel or `pip install .` had no tables."""
    monkeypatch.delenv("GPIPE_BENCH_CONFIGS", raising=False)
    import gpipe_bench

    assert config.config_dir() == Path(gpipe_bench.__file__).resolve().parent / "configs"
    assert config.table_names() == ["amoebanetd-memory", "amoebanetd-speed", "resnet101-accuracy", "resnet101-speed"]


def test_a_model_that_cannot_be_imported_is_an_error_not_a_skipped_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """config.rules.model_length swallowed ImportError: a broken torchvision silently dropped the balance-sum check."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("torchvision is broken")

    monkeypatch.setattr(rules, "_LENGTHS", {})
    monkeypatch.setattr(models, "count", broken)
    with pytest.raises(ConfigError, match="cannot be built to check the balances.*torchvision is broken"):
        config.load("resnet101-speed")


@pytest.mark.parametrize(
    "table, extra, needles",
    [
        ("amoebanetd-speed", {"data": "dataloader"}, ["settings.extra.data", "fixed-batch"]),
        ("resnet101-speed", {"batches": 3}, ["settings.extra.batches", "unknown key"]),
        ("amoebanetd-memory", {"steps": 0}, ["settings.extra.steps", "at least 1"]),
        ("resnet101-accuracy", {"warmup_step": "epoch"}, ["warmup_step", "iteration"]),
        ("resnet101-accuracy", {"train_transforms": ["random_crop"]}, ["train_transforms", "random_resized_crop"]),
        ("resnet101-accuracy", {"lr_milestones": [60, 30]}, ["lr_milestones", "increasing order"]),
        ("resnet101-accuracy", {"lr_milestones": [-1]}, ["lr_milestones[0]", "must not be negative"]),
        ("resnet101-accuracy", {"warmup_epochs": "four"}, ["warmup_epochs", "not a number"]),
        ("resnet101-accuracy", {"memory_format": "nhwc"}, ["memory_format", "'nhwc'", "contiguous, channels_last"]),
    ],
)
def test_settings_extra_is_validated(tmp_path: Path, table: str, extra: Dict[str, Any], needles: List[str]) -> None:
    """settings.extra was never validated: `data: dataloader` in a config was read by nothing."""

    def mutate(data: Dict[str, Any]) -> None:
        data["settings"].setdefault("extra", {}).update(extra)

    message = _error(lambda: config.load(str(_write(tmp_path, mutate, table))))
    for needle in needles:
        assert needle in message, (needle, message)


# -- balance: planned --------------------------------------------------------------------------------------------


def test_a_planned_row_has_no_balance_until_it_runs() -> None:
    for name in ("resnet101-speed", "amoebanetd-speed"):
        table = config.load(name)
        for profile in ("published", "quick"):
            row = table.row("pipeline-2-planned", profile)
            published = table.row("pipeline-2", profile)
            assert row.planned and row.balance is None and not published.planned
            assert (row.batch, row.chunks, row.checkpoint) == (published.batch, published.chunks, published.checkpoint)


def test_memory_tables_do_not_plan(tmp_path: Path) -> None:
    message = _error(
        lambda: config.load(
            str(_write(tmp_path, _set("rows", "pipeline-2", "balance", value="planned"), "amoebanetd-memory"))
        )
    )
    assert "only pipeline rows of speed tables are planned" in message
