"""A speed table for any registered model: its plain model on one device, with nothing published.

Why: a prediction for a model no published table measured (the ResNet-50 of a
vendor's table, a user's own model) still needs a row to predict. The row is
the plain model (``naive-1``) at a batch the user may override, in the
published table's settings (fixed random batch, SGD, no momentum); there is no
published figure to set beside it.
"""

from __future__ import annotations

from .types import Profile, Published, Row, Settings, Table

__all__ = ["plain_table"]


def _profile(name: str, description: str, input_size: int, batch: int, classes: int) -> Profile:
    settings = Settings(
        input_size=input_size,
        dataset_size=50000,
        epochs=10,
        skip_epochs=1,
        optimizer={"name": "sgd", "lr": 0.1},
        classes=classes,
        extra={"data": "fixed-batch"},
    )
    row = Row(
        name="naive-1",
        mode="naive",
        devices=1,
        batch=batch,
        chunks=1,
        balance=None,
        checkpoint="never",
        model_args={},
        published=Published({}),
        note="the plain model on one device",
    )
    return Profile(name, description, settings, (row,), {})


def plain_table(model: str, *, classes: int = 1000) -> Table:
    """``<model>-plain``: the plain model's speed at 224×224 (published) or 64×64 (quick); ``classes`` labels."""
    return Table(
        name=f"{model}-plain",
        title=f"{model}, the plain model",
        kind="speed",
        metric="throughput",
        unit="samples/sec",
        higher_is_better=True,
        baseline="naive-1",
        model=model,
        model_args={},
        source={"reference": f"none: no table of {model} is published; its plain model only"},
        tolerance=0.10,
        path=f"<{model}: plain model>",
        profiles={
            "published": _profile("published", "224x224 images, ImageNet's 1000 classes", 224, 128, classes),
            "quick": _profile("quick", "64x64 images, sized for a CPU", 64, 16, classes),
        },
    )
