"""The model registry: names, building with defaults and overrides, one-line descriptions."""

from __future__ import annotations

import pytest

from gpipe_bench import models


def test_names() -> None:
    assert {"resnet101", "amoebanetd", "amoebanetd-corrected"} <= set(models.names())
    assert models.names() == sorted(models.names())


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known models: .*resnet101"):
        models.build("resnet152")


def test_defaults_and_overrides() -> None:
    assert models.count("resnet101") == (370, 42_520_650)
    assert models.count("resnet101", num_classes=1000)[1] == 44_549_160


def test_describe() -> None:
    line = models.describe("resnet101")
    assert line.startswith("resnet101: 370 layers, 42,520,650 parameters;")


def test_build_meta_holds_shapes_only() -> None:
    model = models.build_meta("resnet14", width=8, stem="small", num_classes=10)
    parameters = list(model.parameters())
    assert parameters and all(p.is_meta for p in parameters)
    assert models.count("resnet14", width=8, stem="small", num_classes=10) == (
        len(model),
        sum(p.numel() for p in parameters),
    )
