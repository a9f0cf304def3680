"""ImageNet from ``train/`` and ``val/`` class folders, with the published augmentations.

Why folders: that is how ImageNet is kept by everyone who has it (torchvision's
``ImageFolder`` layout; the ``val`` images sorted into class folders). The
layout is checked before anything trains, so a wrong path is one line, not a
traceback an hour in. torchvision is imported only when a dataset is built:
checking a layout (the CLI does it up front) should not pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, cast

import torch
from torch.utils.data import Dataset

from .fashion_mnist import DataError

__all__ = ["EXTENSIONS", "MEAN", "SPLITS", "STD", "DataError", "check_layout", "dataset", "folders", "transform"]

#: The per-channel statistics every published ImageNet ResNet normalizes with.
MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

SPLITS = ("train", "val")

#: What ImageFolder loads (its IMG_EXTENSIONS); a folder of anything else is empty to it.
EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})

_LAYOUT = "expected PATH/train/<class>/<image> and PATH/val/<class>/<image> (torchvision ImageFolder layout)"


def _has_image(folder: Path) -> bool:
    # Stops at the first image: cheap even on a class folder of 1,300 JPEGs.
    return any(f.suffix.lower() in EXTENSIONS and f.is_file() for f in folder.rglob("*"))


def check_layout(path: Path) -> Path:
    """``path`` if it holds ``train/`` and ``val/`` with the same class folders, each with an image; DataError otherwise."""
    if not path.is_dir():
        raise DataError(f"--data {path}: no such directory; {_LAYOUT}")
    missing = [f"no {split}/ directory" for split in SPLITS if not (path / split).is_dir()]
    if missing:  # both named at once: one fix, not two runs
        raise DataError(f"--data {path}: {', '.join(missing)}; {_LAYOUT}")
    classes: Dict[str, List[str]] = {}
    for split in SPLITS:
        root = path / split
        names = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not names:
            raise DataError(f"--data {path}: {split}/ has no class folders; {_LAYOUT}")
        empty = [n for n in names if not _has_image(root / n)]
        if empty:
            raise DataError(
                f"--data {path}: {split}/{empty[0]} holds no images ({len(empty)} empty class folder(s)); {_LAYOUT}"
            )
        classes[split] = names
    if classes["train"] != classes["val"]:
        raise DataError(
            f"--data {path}: train/ has {len(classes['train'])} classes, val/ {len(classes['val'])}, "
            f"and they differ; {_LAYOUT}"
        )
    return path


def transform(
    split: str, input_size: int = 224, val_resize: int = 256, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
) -> Any:
    """The published recipe: RandomResizedCrop + flip to train, Resize + CenterCrop to validate, then normalize.

    Returned as torchvision's ``Compose`` (untyped, hence ``Any``).
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not an ImageNet folder; use train or val")
    from torchvision import transforms  # imported when used

    norm = transforms.Normalize(list(mean), list(std))
    if split == "train":
        steps = [transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(val_resize), transforms.CenterCrop(input_size)]
    return transforms.Compose([*steps, transforms.ToTensor(), norm])


def _folder(
    path: Path, split: str, input_size: int, val_resize: int, mean: Sequence[float], std: Sequence[float]
) -> Dataset[Tuple[torch.Tensor, int]]:
    recipe = transform(split, input_size, val_resize, mean, std)
    from torchvision import datasets

    return cast("Dataset[Tuple[torch.Tensor, int]]", datasets.ImageFolder(str(path / split), recipe))


def dataset(
    path: Path,
    split: str,
    input_size: int = 224,
    val_resize: int = 256,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> Dataset[Tuple[torch.Tensor, int]]:
    """``split`` ("train" or "val") of the ImageNet folders at ``path``: (image ``float [3, S, S]``, class index).

    The split is checked before the disk, the layout before torchvision lists a single file.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not an ImageNet folder; use train or val")
    check_layout(path)
    return _folder(path, split, input_size, val_resize, mean, std)


def folders(
    path: Path, input_size: int, val_resize: int, normalize: Mapping[str, Sequence[float]]
) -> Tuple[Dataset[Tuple[torch.Tensor, int]], Dataset[Tuple[torch.Tensor, int]]]:
    """(train, val) datasets with the published augmentations; ``normalize`` holds ``mean`` and ``std``.

    One layout check for both splits: on a real ImageNet tree it walks 2,000 class folders.
    """
    check_layout(path)
    mean, std = normalize["mean"], normalize["std"]
    return (
        _folder(path, "train", input_size, val_resize, mean, std),
        _folder(path, "val", input_size, val_resize, mean, std),
    )
