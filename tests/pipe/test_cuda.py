"""The engine on CUDA: streams, copies between devices, shared devices. Skipped without a GPU.

Every test has a timeout: a pipeline that deadlocks (the backward on two GPUs
once did) fails its test instead of stalling ``make gpu-check``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, List, Optional

import pytest
import torch
from torch import Tensor, nn

from gpipe_bench.pipe import GPipe
from gpipe_bench.pipe.skip import Namespace
from helpers import Pop, Stash

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(120)]


def _model() -> nn.Sequential:
    ns = Namespace()
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        Stash().isolate(ns),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Dropout(0.0),
        nn.Conv2d(8, 8, 3, padding=1),
        Pop().isolate(ns),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _devices(n: int) -> List[str]:
    count = torch.cuda.device_count()
    return [f"cuda:{j % count}" for j in range(n)]


def _compare(devices: List[str], checkpoint: str, chunks: int, stream: Optional[torch.cuda.Stream] = None) -> None:
    """Forward and backward (and BatchNorm statistics) equal the plain model's on the same micro-batches."""
    torch.manual_seed(0)
    plain = _model().double().cuda()
    gpipe = GPipe(copy.deepcopy(plain).cpu(), [3, 4, 5], devices=devices, chunks=chunks, checkpoint=checkpoint)
    first = torch.device(devices[0]) if devices[0] != "cpu" else torch.device("cpu")
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64, device=first, requires_grad=True)
    weight = torch.randn(8, 4, dtype=torch.float64, device=devices[-1])
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        out = gpipe(x)
        (out * weight).sum().backward()
    torch.cuda.synchronize()
    xr = x.detach().cuda().requires_grad_()
    ref = torch.cat([plain(piece) for piece in xr.chunk(chunks)])
    (ref * weight.cuda()).sum().backward()
    assert out.device == torch.device(devices[-1])
    assert torch.allclose(out.to(ref.device), ref, rtol=1e-10, atol=1e-12)
    assert x.grad is not None and x.grad.device == x.device
    assert torch.allclose(x.grad.cuda(), xr.grad, rtol=1e-9, atol=1e-12)
    for p, q in zip(gpipe.parameters(), plain.parameters()):
        assert p.grad is not None and q.grad is not None
        assert torch.allclose(p.grad.to(q.device), q.grad, rtol=1e-9, atol=1e-12)
    for a, b in zip(gpipe.buffers(), plain.buffers()):
        assert torch.allclose(a.to(b.device).double(), b.double(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
def test_one_gpu_shared_by_all_partitions(checkpoint: str) -> None:
    _compare(["cuda:0"] * 3, checkpoint, chunks=4)


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
def test_distinct_gpus(checkpoint: str) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _compare(_devices(3), checkpoint, chunks=4)


@pytest.mark.parametrize(
    "devices", [["cpu", "cuda:0", "cuda:0"], ["cuda:0", "cpu", "cuda:0"], ["cuda:0", "cuda:0", "cpu"]]
)
@pytest.mark.parametrize("checkpoint", ["always", "never"])
def test_mixed_host_and_gpu_partitions(devices: List[str], checkpoint: str) -> None:
    """Two workers, one on the host: GPU-to-host copies must land before the CPU worker reads them,
    and each worker must run its own backward (with the GPU's autograd thread it deadlocked)."""
    _compare(devices, checkpoint, chunks=4)


def test_two_gpus_with_a_host_partition() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _compare(["cuda:0", "cpu", "cuda:1"], "except_last", chunks=4)


@pytest.mark.parametrize("devices", [["cuda:0"] * 3, ["cuda:0", "cpu", "cuda:0"], ["cuda:0", "cuda:1", "cuda:0"]])
def test_training_under_a_non_default_caller_stream(devices: List[str]) -> None:
    """The caller's stream must wait for every device's gradients, not only the first device's."""
    if "cuda:1" in devices and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _compare(devices, "except_last", chunks=4, stream=torch.cuda.Stream())


class _TupleHead(nn.Module):
    def forward(self, xs: Any) -> Tensor:
        index, x = xs
        out: Tensor = x * (index.to(x.device, x.dtype).view(-1, 1) + 1.0)
        return out


def test_tuple_whose_first_tensor_is_on_the_host_waits_for_the_gpu_one() -> None:
    """The ready event was recorded only when the tuple's *first* tensor was on a GPU.

    Here the first is a host tensor and the second is written by a long kernel on the
    caller's side stream just before the call: the pipeline must read it finished.
    """
    gpipe = GPipe(nn.Sequential(_TupleHead(), nn.Linear(256, 256)), [1, 1], devices=["cpu", "cuda:0"], chunks=2)
    side = torch.cuda.Stream()
    base = torch.randn(256, 256, device="cuda:0")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        slow = base
        for _ in range(50):
            slow = torch.tanh(slow @ base)  # keeps the side stream busy
        x = slow[:8].clone()
        index = torch.arange(8) % 3
        out = gpipe((index, x))
    torch.cuda.synchronize()
    head = x * (index.cuda().float().view(-1, 1) + 1.0)
    with torch.no_grad():
        expected = gpipe[1](head)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_input_on_host_is_moved_and_gradient_returns() -> None:
    layers = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    gpipe = GPipe(layers, [2, 1], devices=["cuda:0", "cuda:0"], chunks=2)
    x = torch.randn(6, 4, requires_grad=True)
    gpipe(x).sum().backward()
    assert x.grad is not None and x.grad.device.type == "cpu"


def test_dropout_masks_replay_on_gpu() -> None:
    torch.manual_seed(0)
    gpipe = GPipe(
        nn.Sequential(nn.Dropout(0.5), nn.Identity()),
        [1, 1],
        devices=["cuda:0", "cuda:0"],
        chunks=4,
        checkpoint="always",
    )
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


class _Busy(nn.Module):
    """Keeps its stream busy for a while before handing its input on unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        work = torch.ones(1024, 1024, device=x.device, dtype=x.dtype)
        for _ in range(20):
            work = work @ work / 1024
        return x + 0 * work[0, 0]


def test_deferred_batchnorm_commit_waits_for_every_gpu_under_a_caller_stream() -> None:
    """Regression: the commit (on the caller's stream) was ordered after the last GPU only."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.manual_seed(0)
    plain = nn.Sequential(_Busy(), nn.BatchNorm1d(16), nn.Linear(16, 16), nn.BatchNorm1d(16)).double().cuda()
    gpipe = GPipe(copy.deepcopy(plain).cpu(), [2, 2], devices=["cuda:0", "cuda:1"], chunks=4, deferred_batch_norm=True)
    x = torch.randn(32, 16, dtype=torch.float64, device="cuda:0")
    with torch.cuda.stream(torch.cuda.Stream("cuda:0")), torch.cuda.stream(torch.cuda.Stream("cuda:1")):
        gpipe(x).sum().backward()
    torch.cuda.synchronize()
    plain(x).sum().backward()
    ours = [b for name, b in gpipe.named_buffers() if not name.endswith(("acc_mean", "acc_m2"))]
    assert len(ours) == len(list(plain.buffers()))
    for a, b in zip(ours, plain.buffers()):
        assert torch.allclose(a.to(b.device).double(), b.double(), rtol=1e-9, atol=1e-12)
