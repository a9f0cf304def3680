"""One cell's backward: autograd's engine called at its own price.

Why a module for one call? GPipe cuts the autograd graph at every partition
boundary, so a training step makes one autograd call per cell: 256 calls for
32 micro-batches over 8 partitions, where the plain model makes one per
micro-batch. On a host-bound step (small micro-batches on a fast GPU, or tiny
layers on a CPU) each call's fixed cost counts. :func:`torch.autograd.grad`
spends about 12 µs of Python per call before the engine starts (measured on
a 2-core Xeon, torch 2.14.1: 21.6 µs for a one-operator graph through it,
9.5 µs through the engine directly): it normalises its arguments, checks the
gradients' shapes (the engine checks them again), and copies the context
variables for compiled autograd's device threads, which an eager engine
running each cell on its own worker never uses.

:func:`cell_grad` passes the engine exactly the arguments
``torch.autograd.grad(outputs, inputs, grads, allow_unused=True)`` passes it.
Where the engine's entry point is missing (another PyTorch), or where a tensor
subclass or mode overrides torch functions (their ``grad`` must see the
call), it calls :func:`torch.autograd.grad` itself: same result, full price.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.overrides import has_torch_function

__all__ = ["cell_grad"]


def _engine_entry() -> Optional[Callable[..., Tuple[Optional[Tensor], ...]]]:
    engine: Any = getattr(torch.autograd.Variable, "_execution_engine", None)
    return getattr(engine, "run_backward", None)


_run_backward = _engine_entry()


def cell_grad(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], grads: Sequence[Tensor]
) -> Tuple[Optional[Tensor], ...]:
    """Gradients of ``outputs`` (weighted by ``grads``) with respect to ``inputs``; ``None`` where unused.

    The graph is freed as it is walked (no ``retain_graph``), and nothing is
    accumulated into any ``.grad``.
    """
    outs, ins = tuple(outputs), tuple(inputs)
    if _run_backward is None or has_torch_function(outs + ins):
        return tuple(torch.autograd.grad(outs, ins, tuple(grads), allow_unused=True))
    # (tensors, grad_tensors, keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad)
    return tuple(_run_backward(outs, tuple(grads), False, False, ins, True, False))
