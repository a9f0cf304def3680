"""Measure one cost per layer of an ``nn.Sequential``: time, or memory for training.

Why this module exists: automatic balancing needs a number per layer, and both
numbers have to be taken without disturbing the user's model. Running the real
layers would move parameters, update BatchNorm running statistics, leave
``.grad`` behind and consume the random stream. So every layer is deep-copied
*on its own* onto the target device, profiled, and dropped before the next one
is copied: the user's modules are never run, and a model too large for one
device never has to fit there whole.

The layers are walked in order, each fed the (detached) output of the one
before, so tuple-passing layers and skippable layers, which stash and pop
tensors through a thread-local tracker, behave as they do in a plain run.

Why the size profiler counts saved tensors instead of reading the CUDA
allocator as torchgpipe did: what a layer costs in training memory is what
autograd keeps alive for its backward plus its output. Counting exactly those
tensors (through :func:`torch.autograd.graph.saved_tensors_hooks`) is device
independent, so it works on CPU, CUDA and even ``meta`` (shapes only, no data);
it is deterministic; and it is free of the caching allocator's rounding, block
reuse and fragmentation, which make peak-memory deltas noisy per layer.
"""

from __future__ import annotations

import copy
import gc
import math
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Set, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["Tensors", "TensorOrTensors", "profile_times", "profile_sizes"]

Tensors = Tuple[Tensor, ...]
TensorOrTensors = Union[Tensor, Tensors]


def _as_tuple(value: object, where: str) -> Tuple[Tensors, bool]:
    """``(tensors, atomic)``: the value as a tuple, and whether it was a bare tensor."""
    if isinstance(value, Tensor):
        return (value,), True
    if isinstance(value, tuple) and value and all(isinstance(x, Tensor) for x in value):
        return value, False
    raise TypeError(f"{where} must be a Tensor or a non-empty tuple of Tensors, got {_describe(value)}")


def _describe(value: object) -> str:
    if isinstance(value, tuple):
        return "tuple of (" + ", ".join(type(x).__name__ for x in value) + ")"
    return type(value).__name__


def _unpack(tensors: Tensors, atomic: bool) -> TensorOrTensors:
    return tensors[0] if atomic else tensors


def _needs_grad(tensor: Tensor) -> bool:
    # Only floating and complex tensors can carry gradients; integer inputs
    # (token ids, masks) stay plain.
    return tensor.is_floating_point() or tensor.is_complex()


def _feed(tensors: Tensors) -> Tuple[Tensors, Tensors]:
    """Prepare a layer's input: ``(leaves, fed)``.

    ``leaves`` are detached tensors, the floating ones requiring grad, so the
    layer's backward stops at its own input and only this layer is measured.
    ``fed`` is what the layer actually receives: a clone of each leaf that
    requires grad. A leaf that requires grad cannot be modified in place, but a
    layer such as ``nn.ReLU(inplace=True)`` does exactly that to its input;
    handing it a non-leaf clone keeps such layers working (as they do inside
    the pipeline, where partition inputs are not leaves either).
    """
    leaves = tuple(t.detach().requires_grad_(True) if _needs_grad(t) else t.detach() for t in tensors)
    fed = tuple(t.clone() if t.requires_grad else t for t in leaves)
    return leaves, fed


def _first_input(input: TensorOrTensors, device: torch.device, chunks: int = 1) -> Tuple[Tensors, bool]:
    """The profiling input on ``device``: the first of ``chunks`` micro-batches.

    Each tensor keeps its first ``ceil(B / chunks)`` rows, the size of the first
    piece :func:`torch.chunk` (and so GPipe) would cut. Cloned, so an in-place
    first layer can never write into the caller's tensor.
    """
    tensors, atomic = _as_tuple(input, "the sample input")
    out: List[Tensor] = []
    for t in tensors:
        if chunks > 1 and t.dim() > 0:
            t = t[: math.ceil(t.size(0) / chunks)]
        out.append(t.detach().to(device).clone())
    return tuple(out), atomic


def _replicas(module: nn.Sequential, device: torch.device) -> Iterator[Tuple[str, nn.Module]]:
    """Yield ``(name, copy)`` per layer, copying one layer at a time onto ``device``.

    The caller drops each copy before asking for the next, so at most one
    layer's copy exists at a time. Copies are put in training mode because
    training cost is what balancing is for (torchgpipe did the same, though on
    the real model); the user's modules keep their flags.
    """
    for name, layer in module.named_children():
        replica = copy.deepcopy(layer).to(device)
        replica.train()
        yield name, replica
        # Release this copy before deep-copying the next layer; otherwise the
        # generator frame would keep two copies alive at once.
        del replica


@contextmanager
def _sandbox(device: torch.device) -> Iterator[None]:
    """Grad mode on, and the random streams restored afterwards.

    Dropout in the copies would otherwise advance the caller's generator, and
    a profiling call should not change what the training run draws later.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        rng = torch.random.fork_rng(devices=[index], device_type="cuda")
    else:
        rng = torch.random.fork_rng(devices=[])
    with rng, torch.enable_grad():
        yield


def _call(layer: nn.Module, name: str, fed: Tensors, atomic: bool) -> Tuple[Tensors, bool]:
    output = layer(_unpack(fed, atomic))
    return _as_tuple(output, f"the output of layer '{name}'")


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without a barrier the clock would measure
    # the launch, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _backward(leaves: Tensors, replica: nn.Module, outputs: Tensors) -> None:
    """Run this layer's backward alone with all-ones output gradients.

    :func:`torch.autograd.grad` is given the layer's own inputs and parameters,
    which does two things ``backward()`` would not: no ``.grad`` is written
    anywhere, and autograd never walks into graphs outside this layer. The
    latter matters for skip connections, where a popped tensor still hangs on
    an earlier layer's graph that was already freed by its own backward.
    """
    roots = [t for t in outputs if t.requires_grad]
    targets = [t for t in leaves if t.requires_grad]
    targets += [p for p in replica.parameters() if p.requires_grad]
    if not roots or not targets:
        return
    torch.autograd.grad(roots, targets, [torch.ones_like(t) for t in roots], allow_unused=True)


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Keep Python's cyclic collector out of a timed region.

    Deep-copying layers allocates many objects, so a full collection (tens of
    milliseconds with torch loaded) can fire inside whichever layer runs next
    and bill it for the pause; :mod:`timeit` disables it for the same reason.
    The collector is paused only while the clock runs, so cyclic garbage from
    the copies is still collected between layers.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _time_round(module: nn.Sequential, sample: TensorOrTensors, device: torch.device) -> List[int]:
    """One pass over all layers: forward + backward time of each, in nanoseconds."""
    times: List[int] = []
    batch, atomic = _first_input(sample, device)
    for name, replica in _replicas(module, device):
        leaves, fed = _feed(batch)
        with _no_cyclic_gc():
            _synchronize(device)
            tick = time.perf_counter_ns()
            outputs, atomic = _call(replica, name, fed, atomic)
            _backward(leaves, replica, outputs)
            _synchronize(device)
            times.append(time.perf_counter_ns() - tick)
        # Only the values go on; the graph and the copy are released here.
        batch = tuple(t.detach() for t in outputs)
        del replica, leaves, fed, outputs
    return times


def profile_times(module: nn.Sequential, sample: TensorOrTensors, timeout: float, device: torch.device) -> List[int]:
    """Forward + backward time per layer, summed over rounds, in nanoseconds.

    One warm-up round runs first and is thrown away: it pays one-off costs that
    say nothing about steady-state training (a CPU host's first matrix-multiply
    backward alone took about 0.3 s here, and CUDA adds context creation, lazy
    module loading and cuDNN autotuning), all of which would be billed to
    whichever layer meets them first. Measured rounds then repeat until
    ``timeout`` seconds have passed since the start, with at least one, so a
    model whose round outlasts the timeout costs two rounds, not one.
    """
    started = time.perf_counter()
    with _sandbox(device):
        _time_round(module, sample, device)  # warm-up, discarded
        totals = _time_round(module, sample, device)
        while time.perf_counter() - started < timeout:
            times = _time_round(module, sample, device)
            totals = [a + b for a, b in zip(totals, times)]
    # A layer may time at 0 ns on a coarse clock; that is a valid cost.
    return totals


def _storage_key(tensor: Tensor) -> Tuple[int, int]:
    """(identity, bytes) of the memory ``tensor`` keeps alive.

    Views share their base's storage, so keying by storage makes a tensor saved
    twice, or saved and also returned, count once. The storage's C++ address is
    the identity rather than ``data_ptr()``, which is 0 on ``meta``.
    """
    try:
        storage = tensor.untyped_storage()
        cdata: int = storage._cdata
        return cdata, storage.nbytes()
    except (RuntimeError, NotImplementedError, AttributeError):
        # Tensors without a plain storage (sparse, some subclasses): fall back
        # to the tensor itself and its logical size.
        return id(tensor), tensor.numel() * tensor.element_size()


def profile_sizes(
    module: nn.Sequential,
    input: TensorOrTensors,
    chunks: int,
    param_scale: float,
    device: torch.device,
) -> List[int]:
    """Training memory per layer for one micro-batch, in bytes.

    cost = new memory autograd saves for backward + new memory of the output
    + ``param_scale`` x bytes of the parameters.

    "New" excludes storages the layer did not allocate: its input (already
    counted as the previous layer's output, and held by the pipeline anyway) and
    its own parameters and buffers (counted through ``param_scale``; a Linear,
    for instance, saves its weight for backward). An in-place layer or a view
    such as ``Flatten`` therefore adds nothing for its output, as in reality.
    """
    # Activations are measured for one micro-batch, the unit GPipe runs.
    batch, atomic = _first_input(input, device, chunks)

    sizes: List[int] = []
    with _sandbox(device):
        for name, replica in _replicas(module, device):
            leaves, fed = _feed(batch)
            saved: List[Tensor] = []

            def pack(tensor: Tensor, saved: List[Tensor] = saved) -> Tensor:
                # Keep a reference so the storage (and its address used as a
                # key) stays alive until this layer has been counted.
                saved.append(tensor)
                return tensor

            def unpack(tensor: Tensor) -> Tensor:
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                outputs, atomic = _call(replica, name, fed, atomic)

            existing: Set[int] = set()
            for t in (*leaves, *fed, *replica.parameters(), *replica.buffers()):
                existing.add(_storage_key(t)[0])
            new: Dict[int, int] = {}
            for t in (*saved, *outputs):
                key, nbytes = _storage_key(t)
                if key not in existing:
                    new[key] = nbytes

            param_bytes = sum(p.numel() * p.element_size() for p in replica.parameters())
            sizes.append(int(round(sum(new.values()) + param_scale * param_bytes)))

            batch = tuple(t.detach() for t in outputs)
            del replica, leaves, fed, outputs, saved
    return sizes
