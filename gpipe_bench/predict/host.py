"""What the host spends per operator and per pipeline cell, measured on this machine.

Why measured: on a current GPU a small micro-batch finishes on the device
before the host has issued it, so the host's time per operator decides the
row, and no spec sheet gives it. It is what eager PyTorch costs between two
kernels: the module call and its Python, argument parsing, the dispatcher,
autograd's record of the operator (forward) or its node (backward). None of
that depends on the tensors' sizes, so it is replayed here on tiny ones:

- **per operator** (:class:`HostCosts`): a chain of small convolution,
  BatchNorm and ReLU modules (the layers of the models here) on a 2x4x4x4
  input, one intra-op thread, forward with autograd, forward without it (a
  checkpointed micro-batch's first), and backward; each divided by the
  operators :mod:`.count` counts for the chain. The tiny tensors' CPU kernels
  are in the figure too (a microsecond or two each), standing in for a GPU
  library call's host side;
- **per cell of an engine**: the same chain under our
  :class:`~gpipe_bench.pipe.GPipe` (and torchgpipe 0.0.7's, where it is
  installed) on one device, against the plain chain run on the same
  micro-batches; what the engine adds, per micro-batch cell, forward and
  backward. Torch's pipelining needs a process group and is not replayed.

A GPU adds its kernel launch (the preset's ``launch``) to each operator. The
target's host is assumed as fast per core as this one unless the caller says
otherwise (``--host-speed``: 2 means twice as fast), and every GPU prediction
says so.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import time
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import HarnessError
from .measured import intra_op_threads

__all__ = ["HostCosts", "measure", "CHAIN_BLOCKS"]

#: Conv-BN-ReLU blocks in the replayed chain: enough operators that a timer's resolution does not matter.
CHAIN_BLOCKS = 16
_CHANNELS = 4
_SAMPLE = (2, _CHANNELS, 4, 4)


@dataclass(frozen=True)
class HostCosts:
    """Host seconds measured here: per operator of each pass, and what our engine adds per cell."""

    forward: float  # per operator of a forward with autograd
    nograd: float  # per operator of a forward without autograd
    backward: float  # per operator of a backward
    cell_forward: float  # our engine, per forward cell, beyond its operators
    cell_backward: float  # our engine, per backward cell, beyond its operators
    speed: float = 1.0  # the target host's speed per core against this one's
    #: torchgpipe 0.0.7's (forward, backward) per cell, where it is installed
    peer: Optional[Tuple[float, float]] = None

    def scaled(self, speed: float) -> "HostCosts":
        """The same costs on a host ``speed`` times as fast per core."""
        return replace(self, speed=speed)

    def per_operator(self, direction: str) -> float:
        """Seconds per operator of ``direction`` ('forward', 'nograd' or 'backward') on the target host."""
        return float(getattr(self, direction)) / self.speed

    def per_cell(self, engine: str = "gpipe-bench") -> Tuple[float, float]:
        """(forward, backward) seconds ``engine`` adds per cell on the target host (ours, or torchgpipe)."""
        if engine == "torchgpipe":
            if self.peer is None:
                raise HarnessError(
                    "torchgpipe's cost per cell is measured by running it, and it is not installed; install it with: "
                    "pip install -e '.[peers]'"
                )
            return self.peer[0] / self.speed, self.peer[1] / self.speed
        return self.cell_forward / self.speed, self.cell_backward / self.speed

    def describe(self) -> str:
        where = "this host" if self.speed == 1.0 else f"a host {self.speed:g}x as fast per core as this one"
        return (
            f"host time per operator {self.forward * 1e6:.1f} µs forward, {self.backward * 1e6:.1f} µs backward "
            f"(measured here), on {where}"
        )


def _chain() -> nn.Sequential:
    layers: List[nn.Module] = []
    for _ in range(CHAIN_BLOCKS):
        layers += [nn.Conv2d(_CHANNELS, _CHANNELS, 3, padding=1, bias=False), nn.BatchNorm2d(_CHANNELS), nn.ReLU()]
    return nn.Sequential(*layers)


def _launches() -> Tuple[int, int]:
    """(forward, backward) operators of the chain, as :mod:`.count` counts them (on ``meta``)."""
    from .count import count_model

    with torch.device("meta"):
        twin = _chain()
    layers = count_model(twin, _SAMPLE[1:]).at(_SAMPLE[0])
    return sum(layer.forward.launches for layer in layers), sum(layer.backward.launches for layer in layers)


def _fastest(steps: Sequence[Callable[[], Tuple[float, float]]], samples: int) -> List[Tuple[float, float]]:
    """The fastest of ``samples`` runs of each step, forward and backward apart, after a warm-up.

    The steps take turns, run after run, so a busy spell of a shared machine
    falls on all of them alike; and the fastest run, not the median, is kept:
    what the host costs is a floor that other processes' work can only add to
    (timeit's reasoning).
    """
    for _ in range(3):
        for step in steps:
            step()
    best = [(float("inf"), float("inf")) for _ in steps]
    for _ in range(samples):
        for k, step in enumerate(steps):
            forward, backward = step()
            best[k] = (min(best[k][0], forward), min(best[k][1], backward))
    return best


def _plain_step(model: nn.Module, x: torch.Tensor, grad: bool, micro: int) -> Callable[[], Tuple[float, float]]:
    def step() -> Tuple[float, float]:
        forward = backward = 0.0
        for piece in x.chunk(micro):
            leaf = piece.detach().requires_grad_(grad)
            tick = time.perf_counter()
            with torch.set_grad_enabled(grad):
                out = model(leaf)
            forward += time.perf_counter() - tick
            if grad:
                tick = time.perf_counter()
                torch.autograd.backward(out.sum())
                backward += time.perf_counter() - tick
        return forward, backward

    return step


def _engine_step(pipe: nn.Module, x: torch.Tensor) -> Callable[[], Tuple[float, float]]:
    def step() -> Tuple[float, float]:
        leaf = x.detach().requires_grad_(True)
        tick = time.perf_counter()
        out = pipe(leaf)
        forward = time.perf_counter() - tick
        tick = time.perf_counter()
        torch.autograd.backward(out.sum())
        return forward, time.perf_counter() - tick

    return step


@functools.lru_cache(maxsize=1)
def measure(samples: int = 25) -> HostCosts:
    """The host's costs per operator and per cell, timed here once per process (about a second)."""
    from gpipe_bench.pipe import GPipe

    torch.manual_seed(0)
    model = _chain().train()
    forward_ops, backward_ops = _launches()
    micro = 4
    x = torch.rand(micro * _SAMPLE[0], *_SAMPLE[1:])
    was = gc.isenabled()
    gc.disable()
    try:
        with intra_op_threads(1):
            pipe = GPipe(model, [len(model)], devices=["cpu"], chunks=micro, checkpoint="never")
            steps = [
                _plain_step(model, x[: _SAMPLE[0]], True, 1),
                _plain_step(model, x[: _SAMPLE[0]], False, 1),
                _plain_step(model, x, True, micro),
                _engine_step(pipe, x),
            ]
            if importlib.util.find_spec("torchgpipe") is not None:
                import torchgpipe  # type: ignore[import-not-found, import-untyped, unused-ignore]

                peer_model = _chain().train()
                peer_model.load_state_dict(model.state_dict())
                peer_pipe = torchgpipe.GPipe(
                    peer_model, [len(peer_model)], devices=["cpu"], chunks=micro, checkpoint="never"
                )
                steps.append(_engine_step(peer_pipe, x))
            fastest = _fastest(steps, samples)
            (fwd, bwd), (nograd, _), (plain_f, plain_b), (engine_f, engine_b) = fastest[:4]
    finally:
        if was:
            gc.enable()
    peer = None
    if len(fastest) > 4:
        peer_f, peer_b = fastest[4]
        peer = (max(0.0, (peer_f - plain_f) / micro), max(0.0, (peer_b - plain_b) / micro))
    return HostCosts(
        forward=fwd / forward_ops,
        nograd=nograd / forward_ops,
        backward=bwd / backward_ops,
        cell_forward=max(0.0, (engine_f - plain_f) / micro),
        cell_backward=max(0.0, (engine_b - plain_b) / micro),
        peer=peer,
    )
