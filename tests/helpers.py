"""Pieces several test modules share: a stash/pop pair, the micro-batch reference run, a launch command line."""

from __future__ import annotations

import sys
from typing import Any, List

import torch
from torch import Tensor, nn

from gpipe_bench.pipe.skip import pop, skippable, stash


@skippable(stash=["skip"])
class Stash(nn.Module):
    def forward(self, x: Tensor) -> Any:
        yield stash("skip", x)
        return x


@skippable(pop=["skip"])
class Pop(nn.Module):
    def forward(self, x: Tensor) -> Any:
        skip = yield pop("skip")
        return x + skip


def run_micro_batches(model: nn.Module, x: Tensor, weight: Tensor, chunks: int) -> Tensor:
    """GPipe's definition: the plain model on each micro-batch, gradients of ``(out * weight).sum()`` accumulated."""
    outs = []
    for piece, w in zip(x.chunk(chunks), weight.chunk(chunks)):
        out = model(piece)
        (out * w).sum().backward()
        outs.append(out.detach())
    return torch.cat(outs)


def launch_command(*args: str, nproc: int = 2) -> List[str]:
    """``gpipe-bench launch --nproc N -- ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "gpipe_bench.cli", "launch", "--nproc", str(nproc), "--", *args]
