"""Tests of gpipe_bench.pipe.microbatch: check, scatter and gather."""

from __future__ import annotations

import pytest
import torch

from gpipe_bench.pipe import microbatch
from gpipe_bench.pipe.microbatch import as_tuple, check, gather, scatter, unpack

# Regression (fixed): scatter() only compares the number of chunks of each tensor, so a tuple
# whose tensors have different batch sizes but the same chunk count (8 and 12 rows in 4 chunks, or
# any sizes with chunks=1) is split into misaligned micro-batches instead of raising ValueError


# -- check -------------------------------------------------------------------


def test_check_accepts_tensor() -> None:
    check(torch.zeros(2, 3))


def test_check_accepts_tuple_of_tensors() -> None:
    check((torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)))


@pytest.mark.parametrize(
    "value",
    [
        [torch.zeros(1)],
        1,
        1.5,
        None,
        "tensor",
        (torch.zeros(1), 1),
        (torch.zeros(1), None),
        (torch.zeros(1), (torch.zeros(1),)),
        {"x": torch.zeros(1)},
    ],
    ids=["list", "int", "float", "none", "str", "tuple-int", "tuple-none", "nested-tuple", "dict"],
)
def test_check_rejects(value: object) -> None:
    with pytest.raises(TypeError):
        check(value)


# -- as_tuple / unpack -------------------------------------------------------


def test_as_tuple_and_unpack_round_trip() -> None:
    x = torch.zeros(2)
    tensors, atomic = as_tuple(x)
    assert atomic and len(tensors) == 1 and tensors[0] is x
    assert unpack(tensors, atomic) is x

    pair = (torch.zeros(2), torch.ones(2))
    tensors, atomic = as_tuple(pair)
    assert not atomic and tensors == pair
    assert unpack(tensors, atomic) == pair


# -- scatter -----------------------------------------------------------------


def _sizes(batches: list) -> list:
    return [tuple(t.size(0) for t in b) for b in batches]


def test_scatter_divisible() -> None:
    x = torch.arange(12.0).view(6, 2)
    batches, atomic = scatter(x, 3)
    assert atomic
    assert _sizes(batches) == [(2,), (2,), (2,)]
    for i, (piece,) in enumerate(batches):
        assert torch.equal(piece, x[2 * i : 2 * i + 2])


def test_scatter_indivisible() -> None:
    x = torch.arange(10.0)
    batches, atomic = scatter(x, 4)
    assert atomic
    assert _sizes(batches) == [(3,), (3,), (3,), (1,)]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)


def test_scatter_batch_smaller_than_chunks() -> None:
    x = torch.arange(3.0)
    batches, _ = scatter(x, 5)
    assert _sizes(batches) == [(1,), (1,), (1,)]
    assert [float(b[0]) for b in batches] == [0.0, 1.0, 2.0]


def test_scatter_one_chunk_is_whole_batch() -> None:
    x = torch.randn(5, 3)
    batches, atomic = scatter(x, 1)
    assert atomic and len(batches) == 1
    assert torch.equal(batches[0][0], x)


def test_scatter_tuple_aligned() -> None:
    a = torch.arange(10.0)
    b = torch.arange(10.0).view(10, 1) * 10
    c = torch.arange(10)  # integer tensors ride along
    batches, atomic = scatter((a, b, c), 4)
    assert not atomic
    assert _sizes(batches) == [(3, 3, 3), (3, 3, 3), (3, 3, 3), (1, 1, 1)]
    for pa, pb, pc in batches:
        assert torch.equal(pa * 10, pb.view(-1))
        assert torch.equal(pa.long(), pc)


def test_scatter_tuple_of_one_is_not_atomic() -> None:
    batches, atomic = scatter((torch.zeros(4),), 2)
    assert not atomic
    assert _sizes(batches) == [(2,), (2,)]


@pytest.mark.parametrize("sizes,chunks", [((4, 5), 4), ((10, 3), 4), ((2, 7), 3)])
def test_scatter_mismatched_batch_sizes(sizes: tuple, chunks: int) -> None:
    with pytest.raises(ValueError):
        scatter(tuple(torch.zeros(s) for s in sizes), chunks)


@pytest.mark.parametrize("sizes,chunks", [((8, 12), 4), ((3, 5), 1)])
def test_scatter_mismatched_batch_sizes_same_chunk_count(sizes: tuple, chunks: int) -> None:
    with pytest.raises(ValueError):
        scatter(tuple(torch.zeros(s) for s in sizes), chunks)


def test_scatter_empty_tuple() -> None:
    with pytest.raises(TypeError):
        scatter((), 2)


def test_scatter_keeps_views() -> None:
    # Micro-batches are views of the input (no copy), as with torch.chunk.
    x = torch.zeros(4, 2)
    batches, _ = scatter(x, 2)
    assert batches[0][0].data_ptr() == x.data_ptr()


# -- gather ------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 4, 10, 11])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 8])
def test_gather_inverts_scatter_tensor(batch: int, chunks: int) -> None:
    x = torch.randn(batch, 3)
    batches, atomic = scatter(x, chunks)
    y = gather(batches, atomic)
    assert isinstance(y, torch.Tensor)
    assert torch.equal(y, x)


@pytest.mark.parametrize("batch", [1, 3, 10])
@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_gather_inverts_scatter_tuple(batch: int, chunks: int) -> None:
    xs = (torch.randn(batch, 3), torch.arange(batch), torch.randn(batch, 2, 2))
    batches, atomic = scatter(xs, chunks)
    ys = gather(batches, atomic)
    assert isinstance(ys, tuple) and len(ys) == 3
    for x, y in zip(xs, ys):
        assert y.dtype == x.dtype
        assert torch.equal(y, x)


def test_gather_single_tuple_stays_tuple() -> None:
    xs = (torch.randn(4, 2),)
    batches, atomic = scatter(xs, 2)
    ys = gather(batches, atomic)
    assert isinstance(ys, tuple) and len(ys) == 1
    assert torch.equal(ys[0], xs[0])


def test_module_exports() -> None:
    assert set(microbatch.__all__) >= {"check", "scatter", "gather"}
