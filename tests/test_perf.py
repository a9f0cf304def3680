"""perf.py: the rules the engine, the memory predictor and the reports share, checked against torch and by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpipe_bench import perf
from gpipe_bench.pipe import microbatch

CASES = [(216, 32), (4096, 256), (803, 48), (378, 32), (47, 1), (5, 8), (10, 4), (128, 128), (1, 3)]


@pytest.mark.parametrize("batch, chunks", CASES)
def test_micro_batch_sizes_are_torch_chunk(batch: int, chunks: int) -> None:
    expected = [len(piece) for piece in torch.arange(batch).chunk(chunks)]
    assert perf.micro_batch_sizes(batch, chunks) == expected
    assert perf.effective_microbatches(batch, chunks) == len(expected)


def test_the_engine_scatters_by_the_same_sizes() -> None:
    pieces, _ = microbatch.scatter(torch.zeros(216, 3), 32)
    assert [p[0].size(0) for p in pieces] == perf.micro_batch_sizes(216, 32) == [7] * 30 + [6]
    assert perf.micro_batch_sizes(10, 4) == [3, 3, 3, 1]
    assert perf.micro_batch_sizes(0, 4) == [0]


def test_checkpoint_stop_counts_requested_chunks() -> None:
    assert perf.checkpoint_stop("always", 8) == 8
    assert perf.checkpoint_stop("except_last", 8) == 7
    assert perf.checkpoint_stop("never", 8) == 0
    # 216 in 32 chunks gives 31 micro-batches; except_last stops at 31: every one is recomputed.
    assert perf.checkpointed_microbatches(216, 32, "except_last") == 31
    assert perf.checkpointed_microbatches(64, 8, "except_last") == 7
    with pytest.raises(ValueError, match="checkpoint"):
        perf.checkpoint_stop("sometimes", 2)


def test_split_shares_the_modules() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    parts = perf.split(model, [1, 3, 2])
    assert [len(p) for p in parts] == [1, 3, 2]
    assert parts[1][0] is model[1] and parts[2][1] is model[5]
    assert perf.layer_ranges([1, 3, 2]) == [(0, 1), (1, 4), (4, 6)]
    assert perf.split(list(range(5)), [2, 3]) == [[0, 1], [2, 3, 4]]


def test_ideal_speedup() -> None:
    assert perf.ideal_speedup("pipeline", 8, 512, 64, "except_last") == pytest.approx(8 * 64 / 71 * 0.75)
    assert perf.ideal_speedup("pipeline", 2, 4096, 256, "except_last") == pytest.approx(2 * 256 / 257 * 0.75)
    assert perf.ideal_speedup("pipeline", 1, 96, 1, "always") is None
    assert perf.ideal_speedup("naive", 2, 96, 1, "never") is None
    assert perf.ideal_speedup("pipeline", 8, 216, 32, "except_last") == pytest.approx(8 * 31 / 38 * 0.75)
    assert perf.ideal_speedup("pipeline", 4, 64, 8, "never") == pytest.approx(4 * 8 / 11)
    assert perf.ideal_speedup("pipeline", 4, 64, 1, "except_last") == pytest.approx(
        1.0
    )  # one micro-batch, not recomputed
    assert perf.ideal_speedup("pipeline", 4, 64, 1, "always") == pytest.approx(0.75)  # one micro-batch, recomputed
