"""timeline.recorder: steps recorded on our engine (every cell, in order, on its device's lane) and on the plain model."""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
from torch import nn

from gpipe_bench.pipe import GPipe
from gpipe_bench.timeline.model import Span, Timeline
from gpipe_bench.timeline.recorder import TimelineRecorder


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _spans(t: Timeline, lane: str, phase: str) -> Dict[Tuple[int, int], Span]:
    found = [s for s in t.spans if s.lane == lane and s.phase == phase]
    assert len(found) == len({(s.micro_batch, s.partition) for s in found})  # one each
    return {(s.micro_batch, s.partition): s for s in found}


@pytest.mark.parametrize("checkpoint", ["never", "except_last", "always"])
def test_a_recorded_pipeline_step_has_every_cell_in_order(checkpoint: str) -> None:
    m, devices = 4, ["cpu:0", "cpu:1"]
    gpipe = GPipe(_model(), [2, 3], devices=devices, chunks=m, checkpoint=checkpoint)
    optimizer = torch.optim.SGD(gpipe.parameters(), lr=0.1)
    recorder = TimelineRecorder(devices)
    with recorder.recording():
        gpipe(torch.randn(16, 8)).sum().backward()
        with recorder.host("optimizer"):
            optimizer.step()
    t = recorder.timeline("tiny", {"chunks": m})
    assert t.source == "measured" and t.lanes == ["cpu:0", "cpu:1", "host"]
    assert t.meta == {"clock": "host", "chunks": m}

    cells = {(i, j) for i in range(m) for j in range(2)}
    forward = {**_spans(t, "cpu:0", "forward"), **_spans(t, "cpu:1", "forward")}
    backward = {**_spans(t, "cpu:0", "backward"), **_spans(t, "cpu:1", "backward")}
    recompute = {**_spans(t, "cpu:0", "recompute"), **_spans(t, "cpu:1", "recompute")}
    assert set(forward) == set(backward) == cells
    assert all(s.lane == devices[j] for (_, j), s in {**forward, **backward}.items())
    stop = {"never": 0, "except_last": m - 1, "always": m}[checkpoint]
    assert set(recompute) == {(i, j) for i in range(stop) for j in range(2)}
    for i in range(m):
        assert forward[(i, 1)].start >= forward[(i, 0)].end  # a partition waits for the one before
        assert backward[(i, 0)].start >= backward[(i, 1)].end  # and, backwards, for the one after
        if (i, 1) in recompute:
            assert recompute[(i, 1)].end <= backward[(i, 1)].start
    for j in range(2):  # a device runs its micro-batches in order
        assert all(forward[(i, j)].end <= forward[(i + 1, j)].start for i in range(m - 1))

    host = {s.label: s for s in t.spans if s.lane == "host"}
    assert set(host) == {"loss", "optimizer"} and all(s.phase == "other" for s in host.values())
    assert max(s.end for s in forward.values()) <= host["loss"].start
    assert host["loss"].end <= min(s.start for s in backward.values())
    assert host["optimizer"].start >= max(s.end for s in backward.values())
    assert all(0 <= s.start <= s.end for s in t.spans)
    assert 0 < t.utilisation()["cpu:0"] < 1


def test_partitions_sharing_a_device_share_its_lane_and_recording_stops_with_the_block() -> None:
    gpipe = GPipe(_model(), [2, 3], devices=["cpu", "cpu"], chunks=2, checkpoint="never")
    recorder = TimelineRecorder()  # no devices named: lanes in order of use
    with recorder.recording():
        gpipe(torch.randn(4, 8)).sum().backward()
    gpipe(torch.randn(4, 8)).sum().backward()  # not recorded
    t = recorder.timeline("shared")
    assert t.lanes == ["cpu", "host"]
    assert sorted((s.phase, s.micro_batch, s.partition) for s in t.spans if s.lane == "cpu") == sorted(
        (phase, i, j) for phase in ("forward", "backward") for i in range(2) for j in range(2)
    )


def test_the_plain_model_is_one_forward_and_one_backward() -> None:
    model = _model()
    recorder = TimelineRecorder(["cpu:0"])
    with recorder.model(model, "cpu:0"), recorder.recording():
        nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.zeros(16, dtype=torch.long)).backward()
    t = recorder.timeline("plain")
    assert t.lanes == ["cpu:0", "host"]
    (forward,) = _spans(t, "cpu:0", "forward").values()
    (backward,) = _spans(t, "cpu:0", "backward").values()
    (loss,) = [s for s in t.spans if s.lane == "host"]
    assert (forward.micro_batch, forward.partition) == (0, 0)
    assert 0 <= forward.start <= forward.end <= loss.start <= loss.end <= backward.start <= backward.end
    assert loss.label == "loss" and loss.phase == "other"
    # The hooks are gone with the block.
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.cuda
def test_a_recorded_step_on_cuda_is_in_device_time() -> None:
    devices = ["cuda:0", "cuda:1"] if torch.cuda.device_count() > 1 else ["cuda:0", "cuda:0"]
    m = 4
    gpipe = GPipe(_model(), [2, 3], devices=devices, chunks=m, checkpoint="except_last")
    x = torch.randn(64, 8, device=devices[0])
    gpipe(x).sum().backward()  # warm-up
    recorder = TimelineRecorder(devices)
    with recorder.recording():
        gpipe(x).sum().backward()
    t = recorder.timeline("cuda")
    assert str(t.meta["clock"]).startswith("cuda events")
    assert t.lanes[: len(set(devices))] == list(dict.fromkeys(devices))
    device_spans = [s for s in t.spans if s.lane != "host"]
    assert len([s for s in device_spans if s.phase == "forward"]) == 2 * m
    assert all(-1e-4 <= s.start <= s.end <= t.duration + 1e-3 for s in device_spans)
    forward = {(s.micro_batch, s.partition): s for s in device_spans if s.phase == "forward"}
    for i in range(m):
        assert forward[(i, 1)].start >= forward[(i, 0)].end
