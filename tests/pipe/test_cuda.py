"""The engine on CUDA: streams, copies between devices, shared devices. Skipped without a GPU."""
from __future__ import annotations

import copy
from typing import Any, List

import pytest
import torch
from torch import Tensor, nn

from gpipe_bench.pipe import GPipe
from gpipe_bench.pipe.skip import Namespace
from helpers import Pop, Stash

pytestmark = pytest.mark.cuda


def _model() -> nn.Sequential:
    ns = Namespace()
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        Stash().isolate(ns), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.0),
        nn.Conv2d(8, 8, 3, padding=1), Pop().isolate(ns), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def _devices(n: int) -> List[str]:
    count = torch.cuda.device_count()
    return [f"cuda:{j % count}" for j in range(n)]


def _compare(devices: List[str], checkpoint: str, chunks: int) -> None:
    torch.manual_seed(0)
    plain = _model().double().cuda()
    gpipe = GPipe(copy.deepcopy(plain).cpu(), [3, 4, 5], devices=devices, chunks=chunks, checkpoint=checkpoint)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64, device=devices[0])
    out = gpipe(x)
    out.sum().backward()
    ref = torch.cat([plain(piece) for piece in x.chunk(chunks)])
    ref.sum().backward()
    assert out.device == torch.device(devices[-1])
    assert torch.allclose(out.to(ref.device), ref, rtol=1e-10, atol=1e-12)
    for p, q in zip(gpipe.parameters(), plain.parameters()):
        assert p.grad is not None and q.grad is not None
        assert torch.allclose(p.grad.to(q.device), q.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
def test_one_gpu_shared_by_all_partitions(checkpoint: str) -> None:
    _compare(["cuda:0"] * 3, checkpoint, chunks=4)


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
def test_distinct_gpus(checkpoint: str) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _compare(_devices(3), checkpoint, chunks=4)


def test_input_on_host_is_moved_and_gradient_returns() -> None:
    layers = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    gpipe = GPipe(layers, [2, 1], devices=["cuda:0", "cuda:0"], chunks=2)
    x = torch.randn(6, 4, requires_grad=True)
    gpipe(x).sum().backward()
    assert x.grad is not None and x.grad.device.type == "cpu"


def test_dropout_masks_replay_on_gpu() -> None:
    torch.manual_seed(0)
    gpipe = GPipe(nn.Sequential(nn.Dropout(0.5), nn.Identity()), [1, 1], devices=["cuda:0", "cuda:0"],
                  chunks=4, checkpoint="always")
    x = torch.ones(64, 16, device="cuda:0", requires_grad=True)
    out = gpipe(x)
    out.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, out.detach())  # grad = mask / (1 - p) = output for an all-ones input


def test_streams_do_not_leak_memory() -> None:
    gpipe = GPipe(_model().cuda().cpu(), [3, 4, 5], devices=["cuda:0"] * 3, chunks=4)
    x = torch.randn(8, 3, 6, 6, device="cuda:0")
    for _ in range(3):
        gpipe(x).sum().backward()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(5):
        gpipe(x).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before * 1.05 + 1024
