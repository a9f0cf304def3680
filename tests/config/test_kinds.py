"""Each table kind's settings (gpipe_bench.config.kinds): typed, defaults applied, checked as at load time."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, List, Type

import pytest
import yaml

from gpipe_bench import config
from gpipe_bench.config import AccuracySettings, ConfigError, KindSettings, MemorySettings, SpeedSettings


def _write(tmp_path: Path, name: str, mutate: Callable[[Dict[str, Any]], None]) -> Path:
    data = yaml.safe_load((config.config_dir() / f"{name}.yaml").read_text())
    mutate(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _error(call: Callable[[], Any]) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = info.value.message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("cls", [SpeedSettings, MemorySettings, AccuracySettings])
def test_each_kind_has_exactly_the_keys_its_schema_allows(cls: Type[KindSettings]) -> None:
    assert dataclasses.is_dataclass(cls)
    assert [f.name for f in dataclasses.fields(cls)] == list(cls.SCHEMA)
    assert config.KIND_SETTINGS[cls.KIND] is cls
    assert set(config.KIND_SETTINGS) == set(config.KINDS)
    message = _error(lambda: cls.from_extra({"no_such_key": 1}, "t.yaml"))
    assert message.endswith(f"allowed keys: {', '.join(f.name for f in dataclasses.fields(cls))}")


def test_defaults_are_applied() -> None:
    assert MemorySettings.from_extra({}, "t.yaml") == MemorySettings(
        steps=2, bytes_per_parameter=4, parameter_copies=3, find_balance="balance_by_size"
    )
    assert MemorySettings.from_extra({"steps": 5}, "t.yaml").steps == 5
    assert SpeedSettings.from_extra({}, "t.yaml").data == "fixed-batch"
    recipe = AccuracySettings.from_extra({}, "t.yaml")
    assert (recipe.dataset, recipe.val_size, recipe.val_resize, recipe.lr_scale_batch) == (
        "fashion-mnist",
        1000,
        256,
        256,
    )
    assert (recipe.warmup_epochs, recipe.lr_milestones, recipe.lr_gamma, recipe.runs) == (0.0, (), 0.1, 3)
    assert (recipe.deferred_batch_norm, recipe.memory_format, recipe.normalize) == (False, "contiguous", None)
    assert recipe.train_transforms == ("random_crop", "horizontal_flip", "normalize")
    assert recipe.val_transforms == ("normalize",)


def test_transform_defaults_follow_the_dataset() -> None:
    imagenet = AccuracySettings.from_extra({"dataset": "imagenet"}, "t.yaml")
    assert imagenet.train_transforms == ("random_resized_crop", "horizontal_flip", "normalize")
    assert imagenet.val_transforms == ("resize", "center_crop", "normalize")
    assert AccuracySettings(dataset="imagenet") == imagenet


def test_values_are_typed_and_frozen() -> None:
    recipe = AccuracySettings.from_extra({"lr_milestones": [1, 2.5], "warmup_epochs": 1}, "t.yaml")
    assert recipe.lr_milestones == (1.0, 2.5) and isinstance(recipe.warmup_epochs, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.runs = 5  # type: ignore[misc]


def test_the_shipped_tables_read_typed() -> None:
    memory = config.load("amoebanetd-memory")
    own = MemorySettings.of(memory, memory.profile("published").settings)
    assert (own.steps, own.bytes_per_parameter, own.parameter_copies) == (2, 4, 3)
    accuracy = config.load("resnet101-accuracy")
    published = AccuracySettings.of(accuracy, accuracy.profile("published").settings)
    assert (published.dataset, published.lr_milestones, published.warmup_epochs) == (
        "imagenet",
        (30.0, 60.0, 80.0),
        4.0,
    )
    quick = AccuracySettings.of(accuracy, accuracy.profile("quick").settings)
    assert quick.lr_milestones == (0.6, 0.85) and quick.train_transforms == ("horizontal_flip", "normalize")
    # the mapping as written stays for the records that print it
    assert accuracy.profile("quick").settings.extra["lr_milestones"] == [0.6, 0.85]


def test_a_table_of_another_kind_has_no_such_settings() -> None:
    speed = config.load("resnet101-speed")
    with pytest.raises(TypeError, match="resnet101-speed is a speed table: only memory tables have MemorySettings"):
        MemorySettings.of(speed, speed.profile("quick").settings)


BAD: List[Any] = [
    ("amoebanetd-speed", {"data": "dataloader"}),
    ("resnet101-speed", {"batches": 3}),
    ("amoebanetd-memory", {"steps": 0}),
    ("amoebanetd-memory", {"parameter_copies": "3"}),
    ("amoebanetd-memory", {"find_balance": "balance_by_time"}),
    ("resnet101-accuracy", {"warmup_step": "epoch"}),
    ("resnet101-accuracy", {"train_transforms": ["random_crop"]}),
    ("resnet101-accuracy", {"lr_milestones": [60, 30]}),
    ("resnet101-accuracy", {"lr_milestones": [-1]}),
    ("resnet101-accuracy", {"warmup_epochs": "four"}),
    ("resnet101-accuracy", {"memory_format": "nhwc"}),
    ("resnet101-accuracy", {"deferred_batch_norm": "yes"}),
]


@pytest.mark.parametrize("name, change", BAD)
def test_a_bad_value_is_the_same_line_as_at_load_time(tmp_path: Path, name: str, change: Dict[str, Any]) -> None:
    """Reading a kind's settings and loading the table refuse a bad value in the same words."""

    def mutate(data: Dict[str, Any]) -> None:
        data["settings"].setdefault("extra", {}).update(change)

    path = _write(tmp_path, name, mutate)
    at_load = _error(lambda: config.load(str(path)))
    assert at_load.startswith(f"{path.name}: settings.extra.") or f"/{path.name}: settings.extra." in at_load
    extra = yaml.safe_load(path.read_text())["settings"]["extra"]
    kind = config.KIND_SETTINGS[yaml.safe_load(path.read_text())["kind"]]
    assert _error(lambda: kind.from_extra(extra, str(path.resolve()))) == at_load


def test_fashion_mnist_may_train_without_the_random_crop(tmp_path: Path) -> None:
    """The quick profile leaves the crop out; any other list is refused naming both that the harness applies."""

    def quick(transforms: List[str]) -> Callable[[Dict[str, Any]], None]:
        def mutate(data: Dict[str, Any]) -> None:
            data["profiles"]["quick"]["settings"]["extra"]["train_transforms"] = transforms

        return mutate

    table = config.load(
        str(_write(tmp_path, "resnet101-accuracy", quick(["random_crop", "horizontal_flip", "normalize"])))
    )
    assert AccuracySettings.of(table, table.profile("quick").settings).train_transforms[0] == "random_crop"
    message = _error(lambda: config.load(str(_write(tmp_path, "resnet101-accuracy", quick(["normalize"])))))
    assert "train_transforms" in message and "['horizontal_flip', 'normalize']" in message, message
