"""ImageNet folders: the layout check's one-line errors and the published transforms, on a tiny fake tree."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest
import torch
from PIL import Image

from gpipe_bench.data import imagenet

CLASSES = ("n01440764", "n01443537")


def write_tree(root: Path, classes: Sequence[str] = CLASSES, per_class: int = 2) -> Path:
    """``root/{train,val}/<class>/<k>.png``: small images of odd sizes, one colour per class."""
    for split in imagenet.SPLITS:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                colour = (255 * c, 40 * k, 0)
                Image.new("RGB", (40 + 8 * k, 30), colour).save(folder / f"{k}.png")
    return root


@pytest.mark.parametrize("split", imagenet.SPLITS)
def test_transforms_give_normalized_224_crops(tmp_path: Path, split: str) -> None:
    data = imagenet.dataset(write_tree(tmp_path), split)
    assert len(data) == 4  # type: ignore[arg-type]
    image, label = data[0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert label == 0 and data[3][1] == 1
    # Image 0 of class 0 is black: normalized, each channel is -mean/std.
    expected = [-m / s for m, s in zip(imagenet.MEAN, imagenet.STD)]
    assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)


def test_recipe_is_the_published_one() -> None:
    from torchvision import transforms  # type: ignore[import-untyped]

    train = [type(t) for t in imagenet.transform("train").transforms]
    val = imagenet.transform("val").transforms
    assert train == [
        transforms.RandomResizedCrop,
        transforms.RandomHorizontalFlip,
        transforms.ToTensor,
        transforms.Normalize,
    ]
    assert [type(t) for t in val] == [
        transforms.Resize,
        transforms.CenterCrop,
        transforms.ToTensor,
        transforms.Normalize,
    ]
    assert val[0].size == 256 and list(val[1].size) == [224, 224]
    assert list(val[3].mean) == list(imagenet.MEAN) and list(val[3].std) == list(imagenet.STD)


def test_validation_is_deterministic(tmp_path: Path) -> None:
    val = imagenet.dataset(write_tree(tmp_path), "val")
    assert torch.equal(val[1][0], val[1][0])


def test_folders_gives_both_splits_with_the_same_classes(tmp_path: Path) -> None:
    train, val = imagenet.folders(write_tree(tmp_path), 64, 73, {"mean": [0.5] * 3, "std": [0.25] * 3})
    assert train[0][0].shape == val[0][0].shape == (3, 64, 64)
    assert train.classes == val.classes == list(CLASSES)  # type: ignore[attr-defined]


def _error(path: Path) -> str:
    with pytest.raises(imagenet.DataError) as caught:
        imagenet.check_layout(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "train/<class>/<image>" in message
    return message


def test_layout_errors_name_the_path_and_the_layout(tmp_path: Path) -> None:
    assert "no such directory" in _error(tmp_path / "absent")
    (tmp_path / "file").write_text("")
    assert "no such directory" in _error(tmp_path / "file")
    assert "no train/ directory, no val/ directory" in _error(tmp_path)
    (tmp_path / "train").mkdir()
    assert "no val/ directory" in _error(tmp_path)
    (tmp_path / "val").mkdir()
    assert "train/ has no class folders" in _error(tmp_path)


def test_empty_or_mismatched_class_folders(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "a")
    assert imagenet.check_layout(root) == root
    (root / "val" / "n09999999").mkdir()
    (root / "val" / "n09999999" / "README.txt").write_text("not an image")
    assert "val/n09999999 holds no images" in _error(root)

    other = write_tree(tmp_path / "b")
    (other / "val" / CLASSES[1]).rename(other / "val" / "n09999999")
    assert "and they differ" in _error(other)


def test_bad_split_before_the_disk(tmp_path: Path) -> None:
    with pytest.raises(imagenet.DataError, match="use train or val"):
        imagenet.dataset(tmp_path / "absent", "test")
    with pytest.raises(imagenet.DataError, match="use train or val"):
        imagenet.transform("validation")
