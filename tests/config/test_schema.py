"""The checker every config value goes through (gpipe_bench.config.schema): one line per mistake."""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest

from gpipe_bench.config import ConfigError
from gpipe_bench.config.schema import ABSENT, MISSING, Schema, Source, check_fields, integer, show, text
from gpipe_bench.errors import HarnessError

SCHEMA: Schema = {
    "epochs": (integer(1), MISSING),
    "note": (text, ""),
    "extra": (lambda s, k, v: v, {}),
    "x": (text, ABSENT),
}


def _error(call: Callable[[], Any]) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    assert isinstance(info.value, HarnessError)
    return info.value.message


def test_values_are_spelt_as_yaml_would() -> None:
    assert [show(None), show(True), show("a"), show((1, 2)), show(MISSING)] == [
        "null",
        "true",
        "'a'",
        "[1, 2]",
        "(missing)",
    ]
    assert show("x" * 100) == "'" + "x" * 76 + "..."
    assert show({"a": [1, 2]}) == "{'a': [1, 2]}"


def test_defaults_fill_in_and_absent_keys_stay_out() -> None:
    src = Source("t.yaml")
    first: Dict[str, Any] = check_fields(src, "settings", {"epochs": 3}, SCHEMA)
    assert first == {"epochs": 3, "note": "", "extra": {}}
    first["extra"]["k"] = 1
    assert check_fields(src, "settings", {"epochs": 3}, SCHEMA)["extra"] == {}  # a fresh default each time


def test_mistakes_name_file_key_value_and_fix() -> None:
    src = Source("t.yaml")
    assert _error(lambda: check_fields(src, "settings", {"epoch": 3}, SCHEMA)) == (
        "t.yaml: settings.epoch = 3: unknown key 'epoch' (did you mean 'epochs'?); allowed keys: epochs, note, extra, x"
    )
    assert _error(lambda: check_fields(src, "settings", {}, SCHEMA)) == (
        "t.yaml: settings.epochs = (missing): required key missing; add `epochs:` under settings"
    )
    assert _error(lambda: check_fields(Source("t.yaml", " (after overrides)"), "", {"epochs": 0}, SCHEMA)) == (
        "t.yaml: epochs = 0 (after overrides): must be at least 1; write an integer >= 1"
    )
    assert _error(lambda: check_fields(src, "", [1], SCHEMA)) == (
        "t.yaml: (top level) = [1]: not a mapping; write `key: value` lines with keys epochs, note, extra, x"
    )


def test_a_value_a_flag_gave_is_named_by_the_flag_and_fixes_are_spelt_as_flags() -> None:
    src = Source("t.yaml", " (after overrides)", {"settings.epochs": "--epochs"}, frozenset({"settings.epochs"}))
    assert _error(lambda: check_fields(src, "settings", {"epochs": 0}, SCHEMA)) == (
        "--epochs 0: must be at least 1; write an integer >= 1"
    )
    assert (src.at_most("settings.epochs", 3), src.at_least("settings.epochs", 2)) == (
        "--epochs 3 or less",
        "--epochs 2 or more",
    )
    assert src.at_most("settings.epochs", 0) == "--epochs 0"
    assert (src.at_most("rows.x.chunks", 3), src.at_least("rows.x.chunks", 2)) == ("chunks <= 3", "chunks >= 2")
    assert src.from_flag("settings.epochs") and not src.from_flag("rows.x.chunks")
