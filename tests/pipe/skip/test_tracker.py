"""Tests of gpipe_bench.pipe.skip.tracker: where stashed tensors wait for their pop."""

from __future__ import annotations

import threading
from typing import List

import pytest
import torch
from torch import nn

from gpipe_bench.pipe import GPipe
from gpipe_bench.pipe.skip import pop, skippable, stash
from gpipe_bench.pipe.skip.namespace import DEFAULT_NAMESPACE, Namespace
from gpipe_bench.pipe.skip.tracker import SkipTracker, current_skip_tracker, use_skip_tracker


@skippable(stash=["skip"])
class Stash(nn.Module):
    def forward(self, x):
        yield stash("skip", x)
        return x * 2


@skippable(pop=["skip"])
class Pop(nn.Module):
    def forward(self, x):
        skip = yield pop("skip")
        return x + skip


def test_save_load() -> None:
    tracker = SkipTracker()
    key = (DEFAULT_NAMESPACE, "a")
    t = torch.ones(1)
    tracker.save(key, t)
    assert tracker.load(key) is t
    # A load takes the tensor out.
    with pytest.raises(KeyError):
        tracker.load(key)


def test_keys_are_namespaced() -> None:
    tracker = SkipTracker()
    ns1, ns2 = Namespace(), Namespace()
    a, b = torch.zeros(1), torch.ones(1)
    tracker.save((ns1, "x"), a)
    tracker.save((ns2, "x"), b)
    assert tracker.load((ns2, "x")) is b
    assert tracker.load((ns1, "x")) is a
    with pytest.raises(KeyError):
        tracker.load((DEFAULT_NAMESPACE, "x"))


def test_current_tracker_is_per_thread() -> None:
    mine = current_skip_tracker()
    assert current_skip_tracker() is mine
    theirs: List[SkipTracker] = []
    t = threading.Thread(target=lambda: theirs.append(current_skip_tracker()))
    t.start()
    t.join()
    assert theirs and theirs[0] is not mine


def test_use_skip_tracker_nests_and_restores() -> None:
    outer = current_skip_tracker()
    a, b = SkipTracker(), SkipTracker()
    with use_skip_tracker(a):
        assert current_skip_tracker() is a
        with use_skip_tracker(b):
            assert current_skip_tracker() is b
        assert current_skip_tracker() is a
    assert current_skip_tracker() is outer


def test_use_skip_tracker_restores_after_exception() -> None:
    outer = current_skip_tracker()
    with pytest.raises(ZeroDivisionError):
        with use_skip_tracker(SkipTracker()):
            _ = 1 / 0
    assert current_skip_tracker() is outer


def test_skippable_uses_current_tracker() -> None:
    tracker = SkipTracker()
    x = torch.ones(2)
    with use_skip_tracker(tracker):
        Stash()(x)
    assert list(tracker.tensors.values()) == [x]
    assert not current_skip_tracker().tensors
    with use_skip_tracker(tracker):
        y = Pop()(torch.zeros(2))
    assert torch.equal(y, x)
    assert not tracker.tensors


def test_plain_run_leaves_tracker_empty() -> None:
    model = nn.Sequential(Stash(), nn.Identity(), Pop())
    model(torch.ones(3))
    assert not current_skip_tracker().tensors


@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu:0", "cpu:1"]])
def test_gpipe_leaves_caller_tracker_alone(devices: List[str]) -> None:
    outer = current_skip_tracker()
    model = GPipe(nn.Sequential(Stash(), Pop()), [1, 1], devices=devices, chunks=2)
    x = torch.ones(4, 1, requires_grad=True)
    model(x).sum().backward()
    assert current_skip_tracker() is outer
    assert not outer.tensors
