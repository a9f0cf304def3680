"""Regression tests for engine bugs.

Every bug fixed in ``gpipe_bench`` leaves a test that fails on the code before
the fix and passes after it. A bug that needs a module's own fixtures keeps its
test beside that module's tests, under a ``# Regression (fixed): ...`` comment
saying what went wrong; the rest live here. Fixed so far:

- ``tests/pipe/test_microbatch.py::test_scatter_mismatched_batch_sizes_same_chunk_count``:
  a tuple whose tensors had different batch sizes was split into misaligned micro-batches.
- ``tests/pipe/skip/test_skippable.py::test_stash_none_*``: ``stash(name, None)`` was dropped.
- ``tests/pipe/test_checkpoint.py::test_functional_dropout_mask_replayed_on_cpu_workers``:
  random draws outside dropout modules were not replayed on virtual CPU devices.
- ``tests/pipe/test_worker.py::test_barrier_across_an_empty_clock``: the clock barrier
  waited only for the previous clock.
"""
from __future__ import annotations

import torch
from torch import nn

from gpipe_bench.pipe import GPipe


def test_recompute_does_not_update_plain_batchnorm_twice() -> None:
    """A checkpointed micro-batch's recompute used to update plain BatchNorm statistics again."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    gpipe = GPipe(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double(), [1, 1], devices=["cpu", "cpu"],
                  chunks=2, checkpoint="always")
    for p, q in zip(gpipe.parameters(), plain.parameters()):
        with torch.no_grad():
            p.copy_(q)
    x = torch.randn(8, 3, dtype=torch.float64)
    gpipe(x).sum().backward()
    for piece in x.chunk(2):
        plain(piece)
    bn, ref = gpipe[1], plain[1]
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    assert torch.allclose(bn.running_mean, ref.running_mean, rtol=1e-12)
    assert torch.allclose(bn.running_var, ref.running_var, rtol=1e-12)
