"""Fashion-MNIST from IDX files: parsing, verification, and the one-line errors a user sees."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Dict

import pytest
import torch

from gpipe_bench.data import fashion_mnist as fm


def _idx(tensor: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, tensor.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in tensor.shape)
    return header + tensor.to(torch.uint8).numpy().tobytes()


def write_fake(directory: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> Dict[str, str]:
    """Four small IDX files; returns their checksums (of the uncompressed bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sums = {}
    for split, n in (("train", n_train), ("test", n_test)):
        (images, _), (labels, _), _ = fm.FILES[split]
        for name, t in ((images, torch.randint(0, 256, (n, 28, 28), generator=g)),
                        (labels, torch.arange(n) % 10)):
            raw = _idx(t)
            sums[name] = hashlib.sha256(raw).hexdigest()
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (directory / name).write_bytes(raw)
    return sums


@pytest.mark.parametrize("gz", [True, False])
def test_parses_idx_files(tmp_path: Path, gz: bool) -> None:
    sums = write_fake(tmp_path, gz=gz)
    images, labels = fm.load("train", tmp_path, checksums=sums)
    assert images.shape == (20, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [k % 10 for k in range(20)] and labels.dtype == torch.int64


def test_a_changed_file_fails_verification(tmp_path: Path) -> None:
    write_fake(tmp_path)
    with pytest.raises(fm.DataError, match="does not match Fashion-MNIST"):
        fm.load("test", tmp_path)  # the published checksums: these are not the real files
    fm.load("test", tmp_path, verify=False)


def test_missing_dataset_names_both_fixes(tmp_path: Path) -> None:
    with pytest.raises(fm.DataError) as caught:
        fm.locate(tmp_path)
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data DIR" in message
    assert "\n" not in message and str(tmp_path) in message


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    sums = write_fake(tmp_path, gz=False)
    name = fm.FILES["test"][0][0]
    raw = (tmp_path / name).read_bytes()[:-5]
    (tmp_path / name).write_bytes(raw)
    with pytest.raises(fm.DataError, match="truncated or corrupt"):
        fm.load("test", tmp_path, checksums={**sums, name: hashlib.sha256(raw).hexdigest()})
    with pytest.raises(fm.DataError, match="not an IDX file"):
        fm.parse_idx(b"PK\x03\x04", "x.zip")


def test_bad_split(tmp_path: Path) -> None:
    with pytest.raises(fm.DataError, match="use train or test"):
        fm.load("validation", tmp_path)


@pytest.mark.skipif(not fm.DEFAULT_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (make data)")
def test_the_real_files() -> None:
    images, labels = fm.load("train")
    assert images.shape == (60000, 28, 28)
    assert labels.bincount().tolist() == [6000] * 10
    test_images, test_labels = fm.load("test")
    assert test_images.shape == (10000, 28, 28) and int(test_labels.max()) == 9
