"""Tests of gpipe_bench.pipe.grad.cell_grad: torch.autograd.grad's result at the engine's price."""

from __future__ import annotations

from typing import Any, List

import pytest
import torch
from torch import Tensor, nn

from gpipe_bench.pipe import grad
from gpipe_bench.pipe.grad import cell_grad


def _graph() -> List[Tensor]:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    return [layer(x), x, unused, *layer.parameters()]


def test_equals_torch_autograd_grad_and_leaves_grad_fields_alone() -> None:
    out, *inputs = _graph()
    weights = torch.randn_like(out)
    ours = cell_grad([out], inputs, [weights])
    out, *inputs = _graph()
    theirs = torch.autograd.grad([out], inputs, [weights], allow_unused=True)
    assert len(ours) == len(theirs) == len(inputs)
    assert ours[1] is None and theirs[1] is None  # unused input
    for a, b in zip(ours, theirs):
        if b is not None:
            assert a is not None and torch.equal(a, b)
    assert all(t.grad is None for t in inputs)


def test_the_graph_is_freed() -> None:
    out, *inputs = _graph()
    cell_grad([out], inputs, [torch.ones_like(out)])
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        cell_grad([out], inputs, [torch.ones_like(out)])


class _Logged(Tensor):
    calls: List[Any] = []

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})  # type: ignore[no-untyped-call]


def test_a_tensor_subclass_gets_torch_autograd_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """A subclass overriding torch functions must see the grad call, as with torch.autograd.grad."""
    x = torch.randn(3, requires_grad=True)
    out = (x * 2).as_subclass(_Logged)
    _Logged.calls.clear()
    (g,) = cell_grad([out], [x], [torch.ones(3)])
    assert torch.autograd.grad in _Logged.calls
    assert g is not None and torch.equal(g, torch.full((3,), 2.0))


def test_without_the_engine_entry_point_it_calls_torch_autograd_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grad, "_run_backward", None)
    called: List[int] = []
    real = torch.autograd.grad

    def spy(*args: Any, **kwargs: Any) -> Any:
        called.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    out, *inputs = _graph()
    cell_grad([out], inputs, [torch.ones_like(out)])
    assert called == [1]
