"""Tests of gpipe_bench.pipe.pipeline: what each cell pays for ordering and copies.

Transparency (outputs, gradients, statistics equal to the plain model's) is
tested in ``test_transparency.py``; these tests pin the per-cell work that a
host-bound pipeline (small micro-batches on a fast GPU) pays for: events and
stream contexts that order nothing must not be made.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List

import pytest
import torch
from torch import nn

from gpipe_bench.pipe import GPipe, copy, pipeline, stream
from gpipe_bench.pipe.stream import CPU_STREAM, AbstractStream, Event


def _train(devices: List[str], checkpoint: str = "except_last") -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    gpipe = GPipe(model, [1, 1, 1, 1], devices=devices, chunks=4, checkpoint=checkpoint)
    gpipe(torch.randn(8, 4, requires_grad=True)).sum().backward()


def _count_events(monkeypatch: pytest.MonkeyPatch) -> List[AbstractStream]:
    recorded: List[AbstractStream] = []

    def record(stream: AbstractStream) -> Event:
        recorded.append(stream)
        return None

    monkeypatch.setattr(pipeline, "record_event", record)
    return recorded


@pytest.mark.parametrize("checkpoint", ["never", "except_last"])
def test_one_worker_records_no_event_per_cell(monkeypatch: pytest.MonkeyPatch, checkpoint: str) -> None:
    """All partitions on one device run inline on the caller's stream: nothing to order."""
    recorded = _count_events(monkeypatch)
    _train(["cpu"] * 4, checkpoint)
    assert recorded == []


def test_several_workers_record_an_event_per_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = _count_events(monkeypatch)
    _train(["cpu:0", "cpu:0", "cpu:1", "cpu:1"], "never")
    assert len(recorded) == 2 * 4 * 4  # a forward and a backward event per cell


def test_a_hand_off_within_one_worker_waits_for_nothing() -> None:
    """Partitions 0 and 1 share worker 0 (and its stream): only the hand-off to worker 1 waits."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    pipe = GPipe(model, [1, 1, 1], devices=["cpu:0", "cpu:0", "cpu:1"])._pipeline
    marker = object()
    assert pipe._handed(0, 1, marker) is None  # type: ignore[arg-type]
    assert pipe._handed(1, 2, marker) is marker  # type: ignore[arg-type]
    assert pipe._handed(2, 1, marker) is marker


def test_transfer_enters_the_stream_contexts_once_per_source_device(monkeypatch: pytest.MonkeyPatch) -> None:
    entered: List[AbstractStream] = []
    real = stream.use_stream

    @contextmanager
    def counting(stream: AbstractStream) -> Iterator[None]:
        entered.append(stream)
        with real(stream):
            yield

    monkeypatch.setattr(copy, "use_stream", counting)
    tensors = tuple(torch.randn(2) for _ in range(3))
    moved = copy.transfer(tensors, torch.device("meta"), None, copy.CopyStreams(), CPU_STREAM)
    assert [t.device.type for t in moved] == ["meta"] * 3
    assert len(entered) == 2  # the source's outgoing and the destination's incoming stream, once
