"""Tests of gpipe_bench.pipe.skip.skippable: @skippable, stash and pop.

Skippable layers must run unchanged outside GPipe (a plain nn.Sequential) and
fail loudly when they stash or pop what they did not declare.
"""

from __future__ import annotations

from typing import List

import pytest
import torch
from torch import nn

from gpipe_bench.pipe import GPipe
from gpipe_bench.pipe.skip import pop, skippable, stash
from gpipe_bench.pipe.skip.skippable import Skippable
from gpipe_bench.pipe.skip.tracker import SkipTracker, current_skip_tracker, use_skip_tracker

# Regression (fixed): stash(name, None) is accepted (stash's tensor is Optional, and torchgpipe
# 0.0.7 passes None through to pop), but Skippable.forward never saves a None, so the matching pop
# raises RuntimeError \"'name' has not been stashed\" (and in a pipeline a None crossing
# partitions raises KeyError in Pipeline.forward)


@skippable(stash=["skip"])
class Stash(nn.Module):
    """Stashes its input and passes it through a Linear."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        yield stash("skip", x)
        return self.linear(x)


@skippable(pop=["skip"])
class Pop(nn.Module):
    def forward(self, x):
        skip = yield pop("skip")
        return x + skip


@pytest.fixture(autouse=True)
def _fresh_tracker():
    # A failed layer may leave tensors in the thread's default tracker: give each test its own.
    with use_skip_tracker(SkipTracker()):
        yield


def test_decorated_class() -> None:
    layer = Stash()
    assert isinstance(layer, Skippable)
    assert isinstance(layer, nn.Module)
    assert type(layer).__name__ == "Stash"
    assert "Stashes its input" in (type(layer).__doc__ or "")
    assert Stash.stashable_names == frozenset({"skip"})
    assert Stash.poppable_names == frozenset()
    assert Pop.poppable_names == frozenset({"skip"})
    assert isinstance(layer.module, nn.Module)
    assert repr(layer).startswith("@skippable(")


def test_parameter_names_contain_module() -> None:
    names = [name for name, _ in nn.Sequential(Stash(), Pop()).named_parameters()]
    assert names == ["0.module.linear.weight", "0.module.linear.bias"]
    gpipe = GPipe(nn.Sequential(Stash(), Pop()), [1, 1], devices=["cpu", "cpu"])
    names = [name for name, _ in gpipe.named_parameters()]
    assert names == ["partitions.0.0.module.linear.weight", "partitions.0.0.module.linear.bias"]
    assert all(".module." in name for name in names)
    assert list(gpipe.state_dict().keys()) == names


def test_stash_pop_in_plain_sequential() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Stash(), nn.Tanh(), Pop()).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = model(x)
    linear = model[0].module.linear
    expected = torch.tanh(linear(x)) + x
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=0)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (ex,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(gx, ex, rtol=1e-12, atol=0)
    assert not current_skip_tracker().tensors


def test_skippable_without_generator() -> None:
    @skippable()
    class Plain(nn.Module):
        def forward(self, x):
            return x + 1

    assert torch.equal(Plain()(torch.zeros(1)), torch.ones(1))


def test_stash_and_pop_in_one_layer_different_names() -> None:
    @skippable(stash=["a"])
    class A(nn.Module):
        def forward(self, x):
            yield stash("a", x)
            return x + 1

    @skippable(pop=["a"], stash=["b"])
    class B(nn.Module):
        def forward(self, x):
            a = yield pop("a")
            yield stash("b", a * 10)
            return x

    @skippable(pop=["b"])
    class C(nn.Module):
        def forward(self, x):
            b = yield pop("b")
            return x + b

    model = nn.Sequential(A(), B(), C())
    assert torch.equal(model(torch.ones(1)), torch.tensor([12.0]))


def test_pop_unstashed_raises() -> None:
    with pytest.raises(RuntimeError, match="skip"):
        Pop()(torch.zeros(1))


def test_undeclared_stash_raises() -> None:
    @skippable(stash=["declared"])
    class Wrong(nn.Module):
        def forward(self, x):
            yield stash("declared", x)
            yield stash("other", x)
            return x

    with pytest.raises(RuntimeError, match="other"):
        Wrong()(torch.zeros(1))


def test_undeclared_stash_in_plain_module_raises() -> None:
    @skippable()
    class Wrong(nn.Module):
        def forward(self, x):
            yield stash("skip", x)
            return x

    with pytest.raises(RuntimeError, match="skip"):
        Wrong()(torch.zeros(1))


def test_undeclared_pop_raises() -> None:
    @skippable(stash=["skip"])
    class Wrong(nn.Module):
        def forward(self, x):
            yield stash("skip", x)
            other = yield pop("other")
            return x + other

    current_skip_tracker().tensors.clear()
    with pytest.raises(RuntimeError, match="other"):
        Wrong()(torch.zeros(1))


def test_declared_but_not_stashed_raises() -> None:
    @skippable(stash=["skip"])
    class Lazy(nn.Module):
        def forward(self, x):
            return x
            yield  # pragma: no cover - makes forward a generator

    with pytest.raises(RuntimeError, match="skip"):
        Lazy()(torch.zeros(1))


def test_declared_but_not_popped_raises() -> None:
    @skippable(pop=["skip"])
    class Lazy(nn.Module):
        def forward(self, x):
            return x
            yield  # pragma: no cover

    Stash(1)(torch.zeros(1))
    with pytest.raises(RuntimeError, match="skip"):
        Lazy()(torch.zeros(1))


def test_double_pop_raises() -> None:
    @skippable(pop=["skip"])
    class Twice(nn.Module):
        def forward(self, x):
            a = yield pop("skip")
            b = yield pop("skip")
            return x + a + b

    Stash(1)(torch.zeros(1))
    with pytest.raises(RuntimeError, match="skip"):
        Twice()(torch.zeros(1))


def test_yield_of_non_command_raises() -> None:
    @skippable()
    class Odd(nn.Module):
        def forward(self, x):
            yield x
            return x

    with pytest.raises(TypeError):
        Odd()(torch.zeros(1))


def test_errors_inside_gpipe() -> None:
    @skippable(stash=["skip"])
    class Wrong(nn.Module):
        def forward(self, x):
            yield stash("skip", x)
            yield stash("other", x)
            return x

    model = GPipe(nn.Sequential(Wrong(), Pop()), [1, 1], devices=["cpu:0", "cpu:1"], chunks=2)
    with pytest.raises(RuntimeError, match="other"):
        model(torch.zeros(4, 1))


@skippable(stash=["skip"])
class StashNone(nn.Module):
    def forward(self, x):
        yield stash("skip", None)
        return x


@skippable(pop=["skip"])
class PopNone(nn.Module):
    def forward(self, x):
        skip = yield pop("skip")
        assert skip is None
        return x + 1


def test_stash_none_plain() -> None:
    model = nn.Sequential(StashNone(), PopNone())
    assert torch.equal(model(torch.zeros(1)), torch.ones(1))


@pytest.mark.parametrize("balance", [[2], [1, 1]])
def test_stash_none_in_gpipe(balance: List[int]) -> None:
    devices = ["cpu:0", "cpu:1"][: len(balance)]
    model = GPipe(nn.Sequential(StashNone(), PopNone()), balance, devices=devices, chunks=2)
    assert torch.equal(model(torch.zeros(4, 1)), torch.ones(4, 1))
