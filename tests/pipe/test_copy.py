"""copy.py: where partitions' tensors live, and transfers that leave same-place tensors alone."""

from __future__ import annotations

import torch

from gpipe_bench.pipe.copy import CopyStreams, storage_device, transfer
from gpipe_bench.pipe.stream import CPU_STREAM


def test_virtual_cpu_devices_share_host_memory() -> None:
    for name in ("cpu", "cpu:0", "cpu:3"):
        assert storage_device(torch.device(name)) == torch.device("cpu")


def test_transfer_between_virtual_cpu_devices_is_the_same_tensor() -> None:
    x, y = torch.ones(2), torch.zeros(3)
    moved = transfer((x, y), torch.device("cpu"), None, CopyStreams(), CPU_STREAM)
    assert moved[0] is x and moved[1] is y


def test_transfer_keeps_autograd_history() -> None:
    x = torch.ones(2, requires_grad=True) * 3
    (moved,) = transfer((x,), torch.device("cpu"), None, CopyStreams(), CPU_STREAM)
    assert moved.grad_fn is x.grad_fn
