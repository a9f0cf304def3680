"""Fashion-MNIST from local IDX files: the accuracy table's default dataset, no download at run time.

Why this dataset: a real 10-class image problem (70,000 28×28 grey images, MIT
licence) hard enough that a ResNet's error says something, small enough for a
2-core CPU, and packaged by Debian (``dataset-fashion-mnist``), so a run needs
no network. The files are verified by the SHA-256 of their *uncompressed*
content: the same data gzipped differently still passes, a truncated or
altered file does not. The check is not cached: hashing the 47 MB of training
images takes a few tens of milliseconds, well under the gunzip it follows.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from gpipe_bench.errors import HarnessError

__all__ = ["CLASSES", "DEFAULT_DIR", "FILES", "IMAGE_SIZE", "MEAN", "STD", "DataError", "locate", "load", "parse_idx"]

#: Fashion-MNIST's training-set pixel statistics (scaled to [0, 1]): the default normalisation.
MEAN, STD = [0.2860], [0.3530]

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Every image is 28×28 and every label a class index below 10: the models are sized for that.
IMAGE_SIZE = (28, 28)
CLASSES = 10

#: split -> ((images file, SHA-256), (labels file, SHA-256), image count); hashes of the uncompressed bytes.
FILES: Dict[str, Tuple[Tuple[str, str], Tuple[str, str], int]] = {
    "train": (
        ("train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        ("train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        60000,
    ),
    "test": (
        ("t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        ("t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        10000,
    ),
}

_HOW = (
    "install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist, or `make data` as root) "
    "or pass --data DIR with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
    "t10k-labels-idx1-ubyte (.gz or not)"
)


class DataError(HarnessError):
    """A dataset problem the user can fix: one line naming the path and the fix (exit code 2)."""


def _file(directory: Path, name: str) -> Optional[Path]:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def locate(data: Optional[Path] = None) -> Path:
    """The directory holding the four IDX files: ``data``, or Debian's location."""
    directory = Path(data) if data is not None else DEFAULT_DIR
    missing = [name for split in FILES.values() for name, _ in split[:2] if _file(directory, name) is None]
    if missing:
        where = f"--data {directory}" if data is not None else f"Fashion-MNIST not found in {directory}"
        raise DataError(f"{where}: missing {', '.join(missing)}; {_HOW}")
    return directory


def _read(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"{path}: cannot be read ({error}); re-install the package or pass --data with intact files"
        ) from None


def parse_idx(raw: bytes, where: str) -> torch.Tensor:
    """An IDX file of unsigned bytes (type code 0x08) as a uint8 tensor of its dimensions."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(
            f"{where}: not an IDX file of unsigned bytes; re-install the package or pass --data with the original files"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{where}: truncated header; re-install the package or pass --data with the original files")
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    size = math.prod(dims)
    if len(raw) - header != size:
        raise DataError(
            f"{where}: {len(raw) - header} data bytes for dimensions {dims} ({size} expected); "
            "the file is truncated or corrupt: re-install the package or pass --data with the original files"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def load(
    split: str, data: Optional[Path] = None, *, verify: bool = True, checksums: Optional[Mapping[str, str]] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of ``split`` ("train" or "test").

    ``checksums`` (file name -> SHA-256 of the uncompressed bytes) replaces the
    published ones, for other copies of the files.
    """
    if split not in FILES:
        raise DataError(f"split {split!r} is not a Fashion-MNIST split; use train or test")
    directory = locate(data)
    (images_name, images_sha), (labels_name, labels_sha), count = FILES[split]
    out = []
    for name, expected in ((images_name, images_sha), (labels_name, labels_sha)):
        path = _file(directory, name)
        assert path is not None  # locate checked
        raw = _read(path)
        want = (checksums or {}).get(name, expected)
        if verify and hashlib.sha256(raw).hexdigest() != want:
            raise DataError(
                f"{path}: content does not match Fashion-MNIST's (SHA-256 of the uncompressed bytes); "
                "re-install dataset-fashion-mnist or pass --data with the original files"
            )
        out.append(parse_idx(raw, str(path)))
    images, labels = out
    if (
        images.dim() != 3
        or tuple(images.shape[1:]) != IMAGE_SIZE
        or labels.dim() != 1
        or images.size(0) != labels.size(0)
    ):
        raise DataError(
            f"{directory}: {split} images {list(images.shape)} and labels {list(labels.shape)} are not "
            f"N 28×28 images with N labels; pass --data with the original Fashion-MNIST files"
        )
    # With the published checksums the count is already pinned; this line keeps the table honest if edited.
    if verify and checksums is None and images.size(0) != count:
        raise DataError(f"{directory}: {images.size(0)} {split} images, Fashion-MNIST has {count}")
    if labels.numel() and int(labels.max()) >= CLASSES:
        raise DataError(
            f"{directory}: {split} label {int(labels.max())} is not a class index 0..{CLASSES - 1}; "
            "pass --data with the original Fashion-MNIST files"
        )
    return images, labels.long()
