"""Automatic balancing: choose GPipe's ``balance`` from a profile of the model.

Why this package exists: splitting an ``nn.Sequential`` by hand is tedious and
rarely even. Like ``torchgpipe.balance`` (0.0.7), it offers two profiles, each
reduced to one cost per layer and then split by :mod:`.partition`::

    from gpipe_bench.pipe import GPipe
    from gpipe_bench.pipe.balance import balance_by_time

    sample = torch.rand(128, 3, 224, 224)
    balance = balance_by_time(4, model, sample, device='cuda:0')
    model = GPipe(model, balance, chunks=8)

- :func:`balance_by_time` balances the pipeline's speed (forward + backward
  time per layer);
- :func:`balance_by_size` balances its memory (activations saved for backward,
  outputs, and parameters with their optimizer state).

Names, argument names and defaults follow torchgpipe, including the default
``device=torch.device('cuda')``. Profiling works on copies of the layers, so
the model passed in is left exactly as it was (see :mod:`.profile`).
"""

from __future__ import annotations

from typing import List, Union

import torch
from torch import nn

from .partition import solve
from .profile import TensorOrTensors, profile_sizes, profile_times

__all__ = ["balance_by_time", "balance_by_size"]

Device = Union[torch.device, int, str]


def _check_module(caller: str, partitions: int, module: nn.Module) -> None:
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"{caller}: module must be nn.Sequential, got {type(module).__name__}")
    # Checked before any profiling so a wrong call fails at once, not after it.
    layers = len(module)
    if partitions < 1 or partitions > layers:
        raise ValueError(
            f"{caller}: partitions must be between 1 and the number of layers ({layers}), got {partitions}"
        )


def _resolve_device(caller: str, device: Device) -> torch.device:
    # An int means a CUDA index, as in torchgpipe (torch.device(int) would pick
    # whichever accelerator this build has).
    resolved = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise ValueError(
            f"{caller}: device '{resolved}' was requested but CUDA is not available; "
            f"pass device='cpu' to profile on the CPU"
        )
    count = torch.cuda.device_count()
    if resolved.index is not None and not 0 <= resolved.index < count:
        raise ValueError(f"{caller}: device '{resolved}' does not exist; this machine has {count} CUDA device(s)")
    return resolved


def balance_by_time(
    partitions: int,
    module: nn.Sequential,
    sample: TensorOrTensors,
    *,
    timeout: float = 1.0,
    device: Device = torch.device("cuda"),
) -> List[int]:
    """Balance by forward + backward time per layer.

    Args:
        partitions: how many partitions (pipeline stages) to make.
        module: the sequential model to split; it is not modified.
        sample: an example input (a tensor or a tuple of tensors) of any batch
            size; a realistic micro-batch gives the most faithful times.

    Keyword Args:
        timeout: seconds to keep profiling; after one discarded warm-up
            round, rounds over all layers repeat until it is exceeded, at least
            one (default: 1.0).
        device: where the layer copies run (default: ``'cuda'``).

    Returns:
        Layers per partition, for the ``balance`` argument of ``GPipe``.
    """
    _check_module("balance_by_time", partitions, module)
    target = _resolve_device("balance_by_time", device)
    times = profile_times(module, sample, timeout, target)
    return solve(times, partitions)


def balance_by_size(
    partitions: int,
    module: nn.Sequential,
    input: TensorOrTensors,
    *,
    chunks: int = 1,
    param_scale: float = 2.0,
    device: Device = torch.device("cuda"),
) -> List[int]:
    """Balance by training memory per layer.

    A layer costs the bytes autograd saves for its backward plus its output,
    for one micro-batch, plus ``param_scale`` times its parameter bytes.

    Args:
        partitions: how many partitions (pipeline stages) to make.
        module: the sequential model to split; it is not modified.
        input: an example mini-batch of the size that will be trained (a tensor
            or a tuple of tensors); one micro-batch of it is profiled.

    Keyword Args:
        chunks: the number of micro-batches training will use (default: 1).
        param_scale: how many parameter-sized tensors training keeps per
            parameter: 2.0 for the weight and its gradient (plain SGD), about
            3.0 with momentum, 4.0 for Adam (default: 2.0).
        device: where the layer copies run; ``'meta'`` works and needs no
            memory (default: ``'cuda'``).

    Returns:
        Layers per partition, for the ``balance`` argument of ``GPipe``.
    """
    _check_module("balance_by_size", partitions, module)
    if chunks < 1:
        raise ValueError(f"balance_by_size: chunks must be at least 1, got {chunks}")
    if not param_scale >= 0:  # also rejects NaN
        raise ValueError(f"balance_by_size: param_scale must be non-negative, got {param_scale}")
    target = _resolve_device("balance_by_size", device)
    sizes = profile_sizes(module, input, chunks, param_scale, target)
    return solve(sizes, partitions)
