"""Fashion-MNIST from IDX files: parsing, verification, and the one-line errors a user sees."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

from gpipe_bench.data import fashion_mnist as fm


def _idx(tensor: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, tensor.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in tensor.shape)
    return header + tensor.to(torch.uint8).numpy().tobytes()


def write_fake(
    directory: Path,
    n_train: int = 20,
    n_test: int = 10,
    gz: bool = True,
    side: int = 28,
    n_test_labels: Optional[int] = None,
    classes: int = 10,
) -> Dict[str, str]:
    """Four small IDX files; returns their checksums (of the uncompressed bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sums = {}
    for split, n, n_labels in (("train", n_train, n_train), ("test", n_test, n_test_labels or n_test)):
        (images, _), (labels, _), _ = fm.FILES[split]
        for name, t in (
            (images, torch.randint(0, 256, (n, side, side), generator=g)),
            (labels, torch.arange(n_labels) % classes),
        ):
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


def test_idx_header_is_big_endian() -> None:
    raw = bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    assert fm.parse_idx(raw, "x").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_gz_and_raw_files_mix(tmp_path: Path) -> None:
    sums = write_fake(tmp_path, gz=True)
    name = fm.FILES["train"][1][0]
    (tmp_path / name).write_bytes(gzip.decompress((tmp_path / f"{name}.gz").read_bytes()))
    (tmp_path / f"{name}.gz").unlink()
    assert fm.locate(tmp_path) == tmp_path
    images, labels = fm.load("train", tmp_path, checksums=sums)
    assert images.size(0) == labels.size(0) == 20


def test_matching_checksums_pass_and_one_changed_byte_fails(tmp_path: Path) -> None:
    sums = write_fake(tmp_path, gz=False)
    fm.load("test", tmp_path, checksums=sums)
    name = fm.FILES["test"][0][0]
    raw = bytearray((tmp_path / name).read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / name).write_bytes(bytes(raw))
    with pytest.raises(fm.DataError, match=f"{name}: content does not match.*re-install dataset-fashion-mnist"):
        fm.load("test", tmp_path, checksums=sums)


def test_published_table() -> None:
    assert {split: count for split, (_, _, count) in fm.FILES.items()} == {"train": 60000, "test": 10000}
    for split in fm.FILES.values():
        for _, sha in split[:2]:
            assert len(sha) == 64 and int(sha, 16) >= 0


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


def test_default_location_names_both_fixes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fm, "DEFAULT_DIR", tmp_path / "absent")
    with pytest.raises(fm.DataError) as caught:
        fm.load("train")
    message = str(caught.value)
    assert "not found" in message and "make data" in message and "--data DIR" in message
    assert all(name in message for split in fm.FILES.values() for name, _ in split[:2])


def test_sizes_counts_and_labels_are_checked(tmp_path: Path) -> None:
    with pytest.raises(fm.DataError, match="not N 28×28 images"):
        fm.load("test", tmp_path / "a", checksums=write_fake(tmp_path / "a", side=32))
    with pytest.raises(fm.DataError, match="not N 28×28 images"):
        fm.load("test", tmp_path / "b", checksums=write_fake(tmp_path / "b", n_test_labels=9))
    with pytest.raises(fm.DataError, match="label 11 is not a class index"):
        fm.load("test", tmp_path / "c", checksums=write_fake(tmp_path / "c", n_test=12, classes=12))


def test_corrupt_gzip_is_one_line(tmp_path: Path) -> None:
    write_fake(tmp_path)
    path = tmp_path / f"{fm.FILES['test'][0][0]}.gz"
    good = path.read_bytes()
    for bad in (b"not gzip at all", good[: len(good) // 2], good[:20] + bytes(len(good) - 28) + good[-8:]):
        path.write_bytes(bad)
        with pytest.raises(fm.DataError, match="cannot be read") as caught:
            fm.load("test", tmp_path, verify=False)
        assert "\n" not in str(caught.value)


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    sums = write_fake(tmp_path, gz=False)
    name = fm.FILES["test"][0][0]
    raw = (tmp_path / name).read_bytes()[:-5]
    (tmp_path / name).write_bytes(raw)
    with pytest.raises(fm.DataError, match="truncated or corrupt"):
        fm.load("test", tmp_path, checksums={**sums, name: hashlib.sha256(raw).hexdigest()})
    with pytest.raises(fm.DataError, match="not an IDX file"):
        fm.parse_idx(b"PK\x03\x04", "x.zip")
    with pytest.raises(fm.DataError, match="not an IDX file"):
        fm.parse_idx(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + bytes(4), "floats.idx")  # 0x0D: float32
    with pytest.raises(fm.DataError, match="truncated header"):
        fm.parse_idx(bytes([0, 0, 0x08, 3, 0, 0]), "short.idx")


def test_bad_split(tmp_path: Path) -> None:
    with pytest.raises(fm.DataError, match="use train or test"):
        fm.load("validation", tmp_path)


@pytest.mark.skipif(not fm.DEFAULT_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (make data)")
def test_the_real_files() -> None:
    images, labels = fm.load("train")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert labels.bincount().tolist() == [6000] * 10
    test_images, test_labels = fm.load("test")
    assert test_images.shape == (10000, 28, 28) and test_labels.shape == (10000,)
    assert test_labels.bincount().tolist() == [1000] * 10
