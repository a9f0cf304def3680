"""ImageNet from ``train/`` and ``val/`` class folders, with the published augmentations.

Why folders: that is how ImageNet is kept by everyone who has it (torchvision's
``ImageFolder`` layout; the ``val`` images sorted into class folders). The
layout is checked before anything trains, so a wrong path is one line, not a
traceback an hour in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .fashion_mnist import DataError

__all__ = ["check_layout", "folders"]

_LAYOUT = "expected PATH/train/<class>/<image> and PATH/val/<class>/<image> (torchvision ImageFolder layout)"


def check_layout(path: Path) -> Path:
    """``path`` if it holds ``train/`` and ``val/`` with the same non-empty class folders; DataError otherwise."""
    if not path.is_dir():
        raise DataError(f"--data {path}: no such directory; {_LAYOUT}")
    classes = {}
    for split in ("train", "val"):
        root = path / split
        if not root.is_dir():
            raise DataError(f"--data {path}: no {split}/ directory; {_LAYOUT}")
        names = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not names:
            raise DataError(f"--data {path}: {split}/ has no class folders; {_LAYOUT}")
        empty = [n for n in names if not any(f.is_file() for f in (root / n).iterdir())]
        if empty:
            raise DataError(f"--data {path}: {split}/{empty[0]} holds no images ({len(empty)} empty class folder(s)); {_LAYOUT}")
        classes[split] = names
    if classes["train"] != classes["val"]:
        raise DataError(f"--data {path}: train/ has {len(classes['train'])} classes, val/ {len(classes['val'])}, "
                        f"and they differ; {_LAYOUT}")
    return path


def folders(path: Path, input_size: int, val_resize: int, normalize: Mapping[str, Sequence[float]]) -> Any:
    """(train, val) datasets: RandomResizedCrop + flip for training, Resize + CenterCrop for validation."""
    from torchvision import datasets, transforms  # type: ignore[import-untyped]  # imported when used

    check_layout(path)
    norm = transforms.Normalize(list(normalize["mean"]), list(normalize["std"]))
    train = datasets.ImageFolder(str(path / "train"), transforms.Compose([
        transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]))
    val = datasets.ImageFolder(str(path / "val"), transforms.Compose([
        transforms.Resize(val_resize), transforms.CenterCrop(input_size), transforms.ToTensor(), norm]))
    return train, val
