"""Tests of gpipe_bench.pipe.skip.namespace: isolating the skip names of repeated layers."""

from __future__ import annotations

import copy
import pickle
from typing import List

import pytest
import torch
from torch import nn

from gpipe_bench.pipe import GPipe
from gpipe_bench.pipe.skip import Namespace, pop, skippable, stash, verify_skippables
from gpipe_bench.pipe.skip.namespace import DEFAULT_NAMESPACE


@skippable(stash=["skip"])
class Stash(nn.Module):
    def forward(self, x):
        yield stash("skip", x)
        return x * 0


@skippable(pop=["skip"])
class Pop(nn.Module):
    def forward(self, x):
        skip = yield pop("skip")
        return x + skip


class AddConst(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x):
        return x + self.c


def test_namespace_identity() -> None:
    a, b = Namespace(), Namespace()
    assert a == a and a != b
    assert hash(a) == hash(a)
    assert len({a, b, a}) == 2
    assert (a < b) != (b < a)
    assert sorted([a, b]) == sorted([b, a])
    assert a != "namespace"
    assert "Namespace" in repr(a)
    assert DEFAULT_NAMESPACE not in (a, b)


def test_namespace_survives_copy_and_pickle() -> None:
    a = Namespace()
    assert copy.copy(a) == a
    assert copy.deepcopy(a) == a
    assert pickle.loads(pickle.dumps(a)) == a


def _nested(isolate: bool) -> nn.Sequential:
    # Two stash/pop pairs of the same classes, interleaved: s1 s2 ... p2 p1.
    s1, s2, p2, p1 = Stash(), Stash(), Pop(), Pop()
    if isolate:
        ns1, ns2 = Namespace(), Namespace()
        assert s1.isolate(ns1) is s1
        p1.isolate(ns1)
        s2.isolate(ns2)
        p2.isolate(ns2)
    return nn.Sequential(AddConst(1.0), s1, AddConst(10.0), s2, AddConst(100.0), p2, p1)


def test_same_class_twice_without_namespace_is_rejected() -> None:
    with pytest.raises(TypeError):
        verify_skippables(_nested(isolate=False))
    with pytest.raises(TypeError):
        GPipe(_nested(isolate=False), [7], devices=["cpu"])


def test_isolation_allows_reusing_a_class() -> None:
    model = _nested(isolate=True)
    verify_skippables(model)
    x = torch.zeros(2)
    # s1 stashes 1 and zeroes; +10; s2 stashes 10 and zeroes; +100; p2 adds 10; p1 adds 1.
    assert torch.equal(model(x), torch.full((2,), 111.0))


def test_isolation_only_some_names() -> None:
    @skippable(stash=["a", "b"])
    class StashTwo(nn.Module):
        def forward(self, x):
            yield stash("a", x)
            yield stash("b", x * 2)
            return x

    @skippable(pop=["a", "b"])
    class PopTwo(nn.Module):
        def forward(self, x):
            a = yield pop("a")
            b = yield pop("b")
            return x + a + b

    ns = Namespace()
    s = StashTwo().isolate(ns, only=["a"])
    p = PopTwo()
    assert s.namespaced("a") == (ns, "a")
    assert s.namespaced("b") == (DEFAULT_NAMESPACE, "b")
    with pytest.raises(TypeError):
        verify_skippables(nn.Sequential(s, p))  # 'a' crosses namespaces
    p.isolate(ns, only=["a"])
    verify_skippables(nn.Sequential(s, p))
    assert torch.equal(nn.Sequential(s, p)(torch.ones(1)), torch.tensor([4.0]))


def test_deepcopy_keeps_pairs() -> None:
    model = copy.deepcopy(_nested(isolate=True))
    verify_skippables(model)
    assert torch.equal(model(torch.zeros(1)), torch.tensor([111.0]))


@pytest.mark.parametrize("devices", [["cpu"] * 4, ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]])
@pytest.mark.parametrize("chunks", [1, 3])
def test_isolated_pairs_across_partitions(devices: List[str], chunks: int) -> None:
    # Partitions: [+1, s1] [+10, s2] [+100, p2] [p1]; both skips cross partitions.
    model = GPipe(_nested(isolate=True), [2, 2, 2, 1], devices=devices, chunks=chunks)
    x = torch.zeros(3, 2, requires_grad=True)
    y = model(x)
    assert torch.equal(y, torch.full((3, 2), 111.0, dtype=y.dtype))
    y.sum().backward()
    # The only path from x to the output is through the skip of s1/p1.
    assert torch.equal(x.grad, torch.ones_like(x))
