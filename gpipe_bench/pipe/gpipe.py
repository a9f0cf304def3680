"""The GPipe module: validate, split into partitions, place them, run forward.

Public surface and semantics follow torchgpipe 0.0.7 (same names, arguments,
defaults, coercions and exception types), so code written for that archived
project runs on current PyTorch by changing one import.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import nn

from . import microbatch
from .batchnorm import DeferredBatchNorm
from .checkpoint import CHECKPOINT_MODES, checkpoint_stop
from .copy import storage_device
from .microbatch import TensorOrTensors
from .partitions import layer_ranges
from .pipeline import Pipeline, join
from .skip.layout import inspect_skip_layout, verify_skippables

__all__ = ["GPipe"]

Device = Union[torch.device, int, str]
Devices = Union[Iterable[Device], List[Device]]

_MOVING_DENIED = TypeError("denied to move parameters and buffers, because GPipe should manage device placement")


def _recommend_auto_balance(message: str) -> str:
    return (
        f"{message}\n\nIf your model is still under development, its optimal balance would change "
        "frequently. In this case, we highly recommend 'gpipe_bench.pipe.balance' for naive automatic "
        "balancing:\n\n  from gpipe_bench.pipe import GPipe\n  from gpipe_bench.pipe.balance import balance_by_time\n\n"
        "  partitions = torch.cuda.device_count()\n  sample = torch.empty(...)\n"
        "  balance = balance_by_time(partitions, model, sample)\n\n  model = GPipe(model, balance, ...)\n"
    )


def _verify_module(module: nn.Sequential) -> None:
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"module must be nn.Sequential to be partitioned, got {type(module).__name__}")
    named_children = list(module.named_children())
    if len(named_children) != len(module):
        raise ValueError("module with duplicate children is not supported")
    num_parameters = len(list(module.parameters()))
    num_child_parameters = sum(len(list(child.parameters())) for child in module.children())
    if num_parameters != num_child_parameters:
        raise ValueError("module with duplicate parameters on distinct children is not supported")


def _split_module(
    module: nn.Sequential, balance: Sequence[int], devices: Sequence[torch.device]
) -> Tuple[nn.ModuleList, List[int], List[torch.device]]:
    balance = list(balance)
    if len(module) != sum(balance):
        raise ValueError(
            _recommend_auto_balance(
                f"module and sum of balance have different length (module: {len(module)}, "
                f"sum of balance: {sum(balance)}, balance: {balance})"
            )
        )
    if any(x <= 0 for x in balance):
        raise ValueError(_recommend_auto_balance(f"all balance numbers must be positive integer (balance: {balance})"))
    if len(balance) > len(devices):
        raise IndexError(
            f"too few devices to hold given partitions (devices: {len(devices)}, partitions: {len(balance)}); "
            "pass more devices, or repeat one (e.g. devices=['cuda:0'] * n or ['cpu'] * n)"
        )
    children = list(module.named_children())
    partitions = []
    for (start, end), device in zip(layer_ranges(balance), devices):
        # A plain Sequential of the same named layers (a subclass's constructor may take other arguments).
        partition = nn.Sequential(OrderedDict(children[start:end]))
        partition.to(storage_device(device))
        partitions.append(partition)
    return nn.ModuleList(partitions), balance, list(devices[: len(balance)])


class GPipe(nn.Module):
    """Wraps an ``nn.Sequential`` to train it with GPipe pipeline parallelism.

    The sequence is cut into partitions of ``balance`` layers, partition ``j``
    placed on ``devices[j]``. Each mini-batch is split into ``chunks``
    micro-batches that flow through the partitions on a fill-drain schedule.
    Activations of checkpointed micro-batches are dropped in the forward pass
    and recomputed before backward.

    Devices may repeat (partitions sharing a GPU run one after the other).
    ``'cpu'`` is one worker for every partition placed there; distinct virtual
    CPU devices ``'cpu:0'``, ``'cpu:1'``, … each get a worker thread, so
    partitions run at the same time on a multi-core host, the caller's
    intra-op threads divided among them.

    Args:
        module: the model to pipeline.
        balance: number of layers of each partition.
        devices: a device per partition (default: every CUDA device).
        chunks: number of micro-batches (default 1).
        checkpoint: ``'always'``, ``'except_last'`` (default) or ``'never'``.
        deferred_batch_norm: track BatchNorm running statistics of the whole mini-batch.

    Raises:
        TypeError: the module is not an ``nn.Sequential``, or stash/pop do not match.
        ValueError: invalid arguments, or a balance that does not fit the module.
        IndexError: fewer devices than partitions.
    """

    #: Number of layers in each partition.
    balance: List[int] = []
    #: The device of each partition.
    devices: List[torch.device] = []
    #: Number of micro-batches.
    chunks: int = 1
    #: Checkpoint mode.
    checkpoint: str = "except_last"

    def __init__(
        self,
        module: nn.Sequential,
        balance: Optional[Iterable[int]] = None,
        *,
        devices: Optional[Devices] = None,
        chunks: int = chunks,
        checkpoint: str = checkpoint,
        deferred_batch_norm: bool = False,
    ) -> None:
        super().__init__()
        chunks = int(chunks)
        checkpoint = str(checkpoint)
        if balance is None:
            raise ValueError(_recommend_auto_balance("balance is required"))
        if chunks <= 0:
            raise ValueError(f"number of chunks must be positive integer (chunks: {chunks})")
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(
                f"checkpoint is not one of 'always', 'except_last', or 'never' (checkpoint: {checkpoint!r})"
            )

        _verify_module(module)
        verify_skippables(module)

        self.chunks = chunks
        self.checkpoint = checkpoint
        if deferred_batch_norm:
            module = DeferredBatchNorm.convert_deferred_batch_norm(module, chunks)

        if devices is None:
            devices = range(torch.cuda.device_count())
        resolved = [torch.device(d) for d in devices]
        self.partitions, self.balance, self.devices = _split_module(module, list(balance), resolved)
        self._pipeline = Pipeline(self._partitions(), self.devices, inspect_skip_layout(self._partitions()))

    def _partitions(self) -> List[nn.Sequential]:
        return cast(List[nn.Sequential], list(self.partitions))

    # -- sequence behaviour ---------------------------------------------

    def __len__(self) -> int:
        return sum(len(p) for p in self._partitions())

    def __getitem__(self, index: int) -> nn.Module:
        if not isinstance(index, int):
            raise TypeError(f"GPipe indices must be integers, not {type(index).__name__}")
        length = len(self)
        position = index + length if index < 0 else index
        if not 0 <= position < length:
            raise IndexError(f"index {index} is out of range for {length} layers")
        for partition in self._partitions():
            if position < len(partition):
                return partition[position]
            position -= len(partition)
        raise IndexError(index)  # unreachable

    def __iter__(self) -> Iterator[nn.Module]:
        for partition in self._partitions():
            yield from partition

    # -- device placement is GPipe's -------------------------------------

    def cuda(self, device: Optional[Device] = None) -> "GPipe":
        raise _MOVING_DENIED

    def cpu(self) -> "GPipe":
        raise _MOVING_DENIED

    def to(self, *args: Any, **kwargs: Any) -> "GPipe":
        # Allowed: to(dtype[, non_blocking]). Denied: to(device, ...), to(tensor, ...).
        if "device" in kwargs or "tensor" in kwargs:
            raise _MOVING_DENIED
        if args and (isinstance(args[0], (torch.device, int, str)) or torch.is_tensor(args[0])):
            raise _MOVING_DENIED
        return super().to(*args, **kwargs)

    # -- forward ---------------------------------------------------------

    def forward(self, input: TensorOrTensors) -> TensorOrTensors:
        """Run ``input`` (a tensor or a tuple of tensors, split on dim 0) through the pipeline."""
        microbatch.check(input)
        if not self.devices:
            return input  # an empty sequence is the identity, as in torchgpipe
        batches, atomic = microbatch.scatter(input, self.chunks)
        inputs, _ = microbatch.as_tuple(input)
        grad = torch.is_grad_enabled() and (
            any(t.requires_grad for t in inputs) or any(p.requires_grad for p in self.parameters())
        )
        if self.training:
            stop = checkpoint_stop(self.checkpoint, self.chunks)
        else:
            stop = 0
        outputs, out_atomic, run = self._pipeline.forward(batches, atomic, stop, grad)
        if not grad:
            return microbatch.gather(outputs, out_atomic)
        return join(self._pipeline, run, outputs, inputs, out_atomic)
