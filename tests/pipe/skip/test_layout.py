"""Tests of gpipe_bench.pipe.skip.layout: verify_skippables, the partition routes of skips,
and skips that cross partitions in a running pipeline (same numbers as the plain model)."""

from __future__ import annotations

import copy
from typing import List

import pytest
import torch
from torch import Tensor, nn

from gpipe_bench.pipe import GPipe
from gpipe_bench.pipe.skip import Namespace, pop, skippable, stash, verify_skippables
from gpipe_bench.pipe.skip.layout import inspect_skip_layout
from gpipe_bench.pipe.skip.namespace import DEFAULT_NAMESPACE

F64 = torch.float64
RTOL = 1e-10
D = 4


@skippable(stash=["skip"])
class StashSkip(nn.Module):
    def forward(self, x):
        yield stash("skip", x)
        return x


@skippable(pop=["skip"])
class PopSkip(nn.Module):
    def forward(self, x):
        skip = yield pop("skip")
        return x + skip


@skippable(stash=["skip"], pop=["skip"])
class Both(nn.Module):
    def forward(self, x):
        skip = yield pop("skip")
        yield stash("skip", skip)
        return x


@skippable(stash=["other"])
class StashOther(nn.Module):
    def forward(self, x):
        yield stash("other", x)
        return x


@skippable(pop=["other"])
class PopSkipOther(nn.Module):
    def forward(self, x):
        other = yield pop("other")
        return x + other


@skippable(pop=["missing"])
class PopMissing(nn.Module):
    def forward(self, x):
        missing = yield pop("missing")
        return x + missing


# -- verify_skippables ---------------------------------------------------------


def test_matching_pairs_pass() -> None:
    verify_skippables(nn.Sequential(StashSkip(), nn.ReLU(), PopSkip(), StashOther(), PopSkipOther()))
    verify_skippables(nn.Sequential(nn.ReLU(), nn.Linear(1, 1)))


def _message(model: nn.Sequential) -> str:
    with pytest.raises(TypeError) as excinfo:
        verify_skippables(model)
    return str(excinfo.value)


def test_stash_never_popped() -> None:
    assert "'other'" in _message(nn.Sequential(StashOther(), nn.ReLU()))


def test_pop_without_stash() -> None:
    assert "'missing'" in _message(nn.Sequential(nn.ReLU(), PopMissing()))


def test_pop_before_stash() -> None:
    message = _message(nn.Sequential(PopSkip(), StashSkip()))
    assert message.count("'skip'") == 2  # popped before any stash, and stashed without a later pop


def test_duplicate_name_without_namespace() -> None:
    message = _message(nn.Sequential(StashSkip(), PopSkip(), StashSkip(), PopSkip()))
    assert "'2'" in message and "'3'" in message


def test_stash_and_pop_by_one_layer() -> None:
    assert "'0'" in _message(nn.Sequential(Both()))


def test_all_problems_listed() -> None:
    model = nn.Sequential(
        StashOther(),  # 0: never popped
        PopMissing(),  # 1: nothing stashed
        StashSkip(),  # 2
        PopSkip(),  # 3
        StashSkip(),  # 4: duplicate without namespace
        PopSkip(),  # 5: duplicate pop
        Both(),  # 6: stashes and pops one name
    )
    message = _message(model)
    problems = [line for line in message.splitlines() if line.startswith("* ")]
    assert len(problems) == 5, message
    assert any("'other'" in p for p in problems)
    assert any("'1'" in p and "'missing'" in p for p in problems)
    assert any("'4'" in p for p in problems)
    assert any("'5'" in p for p in problems)
    assert any("'6'" in p for p in problems)


def test_gpipe_construction_raises() -> None:
    for model in (
        nn.Sequential(StashOther(), nn.ReLU()),
        nn.Sequential(nn.ReLU(), PopMissing()),
        nn.Sequential(StashSkip(), PopSkip(), StashSkip(), PopSkip()),
        nn.Sequential(Both(), nn.ReLU()),
    ):
        with pytest.raises(TypeError, match="stash and pop"):
            GPipe(model, [1] * len(model), devices=["cpu"] * len(model))


# -- inspect_skip_layout --------------------------------------------------------


def _partitions(model: nn.Sequential, balance: List[int]) -> List[nn.Sequential]:
    layers = list(model.children())
    parts, k = [], 0
    for size in balance:
        parts.append(nn.Sequential(*layers[k : k + size]))
        k += size
    return parts


def test_layout_routes() -> None:
    ns = Namespace()
    stash_ns, pop_ns = StashSkip().isolate(ns), PopSkip().isolate(ns)
    model = nn.Sequential(StashSkip(), stash_ns, nn.ReLU(), PopSkip(), StashOther(), pop_ns, PopSkipOther())
    layout = inspect_skip_layout(_partitions(model, [2, 2, 2, 1]))
    assert layout.routes == {
        (DEFAULT_NAMESPACE, "skip"): (0, 1),
        (ns, "skip"): (0, 2),
        (DEFAULT_NAMESPACE, "other"): (2, 3),
    }
    assert layout.outgoing(0) == {(DEFAULT_NAMESPACE, "skip"), (ns, "skip")}
    assert layout.outgoing(1) == set()
    assert layout.outgoing(2) == {(DEFAULT_NAMESPACE, "other")}
    assert layout.incoming(0) == []
    assert layout.incoming(1) == [((DEFAULT_NAMESPACE, "skip"), 0)]
    assert layout.incoming(2) == [((ns, "skip"), 0)]
    assert layout.incoming(3) == [((DEFAULT_NAMESPACE, "other"), 2)]


def test_layout_within_one_partition_has_no_route() -> None:
    model = nn.Sequential(StashSkip(), nn.ReLU(), PopSkip())
    layout = inspect_skip_layout(_partitions(model, [3]))
    assert layout.routes == {}
    layout = inspect_skip_layout(_partitions(model, [2, 1]))
    assert layout.routes == {(DEFAULT_NAMESPACE, "skip"): (0, 1)}


# -- skips across partitions in a running pipeline -------------------------------


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D).to(F64)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


@skippable(stash=["skip"])
class StashLinear(nn.Module):
    """Stashes its input (the raw tensor, as an identity shortcut does) or its output."""

    def __init__(self, stash_input: bool) -> None:
        super().__init__()
        self.stash_input = stash_input
        self.linear = nn.Linear(D, D).to(F64)

    def forward(self, x):
        if self.stash_input:
            yield stash("skip", x)
        y = self.linear(x)
        if not self.stash_input:
            yield stash("skip", y)
        return torch.tanh(y)


class Cut(nn.Module):
    """A layer with parameters whose output carries no gradient to its input."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D).to(F64)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.detach())


@skippable(pop=["skip"])
class PopMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(D, dtype=F64) + 0.5)

    def forward(self, x):
        skip = yield pop("skip")
        return x * torch.sigmoid(skip) + skip * self.w


VARIANTS = ["through", "stash-input", "only-skip"]


def _skip_model(variant: str) -> nn.Sequential:
    # Partition 0: [Linear, StashLinear]; partition 1: [Linear or Cut]; partition 2: [PopMul, Linear].
    middle = Cut() if variant == "only-skip" else Linear()
    return nn.Sequential(Linear(), StashLinear(variant == "stash-input"), middle, PopMul(), Linear())


def _run_both(variant: str, chunks: int, checkpoint: str):
    torch.manual_seed(chunks * 7 + len(variant))
    plain = _skip_model(variant)
    gpipe = GPipe(
        copy.deepcopy(plain), [2, 1, 2], devices=["cpu:0", "cpu:1", "cpu:2"], chunks=chunks, checkpoint=checkpoint
    )
    # 7 rows: 1, 2, 3 and 4 micro-batches for chunks 1..4 (sizes 7 / 4,3 / 3,3,1 / 2,2,2,1).
    x = torch.randn(7, D, dtype=F64)
    g = torch.randn(7, D, dtype=F64)
    x_plain, x_gpipe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_plain, y_gpipe = plain(x_plain), gpipe(x_gpipe)
    y_plain.backward(g)
    y_gpipe.backward(g)
    return plain, gpipe, x_plain, x_gpipe, y_plain, y_gpipe


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4])
def test_skip_across_partitions_equals_plain(chunks: int, checkpoint: str, variant: str) -> None:
    plain, gpipe, x_plain, x_gpipe, y_plain, y_gpipe = _run_both(variant, chunks, checkpoint)
    torch.testing.assert_close(y_gpipe, y_plain, rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(x_gpipe.grad, x_plain.grad, rtol=RTOL, atol=1e-12)
    if variant == "only-skip":
        # The middle partition passes no gradient: everything reaching x came through the skip.
        assert x_plain.grad.abs().sum() > 0

    ours = dict(gpipe.named_parameters())
    theirs = dict(plain.named_parameters())
    assert len(ours) == len(theirs)
    partition_of = {"0": 0, "1": 0, "2": 1, "3": 2, "4": 2}
    for name, p in theirs.items():
        q = ours[f"partitions.{partition_of[name.split('.')[0]]}.{name}"]
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=RTOL, atol=1e-12, msg=name)
    # Skippable layers keep their parameters under '.module.'.
    assert "partitions.0.1.module.linear.weight" in ours
    assert "partitions.2.3.module.w" in ours


@pytest.mark.parametrize("mode", ["no_grad", "eval"])
def test_skip_across_partitions_without_grad(mode: str) -> None:
    torch.manual_seed(0)
    plain = _skip_model("through")
    gpipe = GPipe(copy.deepcopy(plain), [2, 1, 2], devices=["cpu:0", "cpu:1", "cpu:2"], chunks=3, checkpoint="always")
    x = torch.randn(7, D, dtype=F64)
    if mode == "eval":
        plain.eval()
        gpipe.eval()
        y, expected = gpipe(x), plain(x)
    else:
        with torch.no_grad():
            y, expected = gpipe(x), plain(x)
    assert y.requires_grad == expected.requires_grad
    torch.testing.assert_close(y, expected, rtol=RTOL, atol=1e-12)
