"""timeline.py: the Chrome trace and the PNG of a step, their paths, and steps recorded on our engine and the plain model.

Also the command line: ``speed --timeline`` writes both files for a tiny row,
and a path it cannot write, or a row it cannot record, is one line and exit 2
before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from gpipe_bench import timeline
from gpipe_bench.cli import main
from gpipe_bench.errors import HarnessError
from gpipe_bench.pipe import GPipe
from gpipe_bench.timeline import Span, Timeline, TimelineRecorder
from helpers import one_line_error, tiny_configs


def _example() -> Timeline:
    spans = [
        Span("cpu:0", "forward", 0, 0, 0.000, 0.002),
        Span("cpu:0", "forward", 1, 0, 0.002, 0.004),
        Span("cpu:1", "forward", 0, 1, 0.002, 0.005),
        Span("cpu:1", "recompute", 0, 1, 0.006, 0.007),
        Span("cpu:1", "backward", 0, 1, 0.007, 0.010),
        Span("host", "other", -1, -1, 0.010, 0.012, "optimizer"),
    ]
    return Timeline("tiny pipeline-2", spans, ["cpu:0", "cpu:1", "host"], meta={"chunks": 2})


# -- the data type -------------------------------------------------------------------------------------------------


def test_busy_counts_overlaps_once_and_utilisation_is_over_the_step() -> None:
    t = Timeline(
        "t",
        [
            Span("a", "forward", 0, 0, 0.0, 2.0),
            Span("a", "backward", 0, 0, 1.0, 3.0),  # overlaps the first
            Span("a", "forward", 1, 0, 5.0, 6.0),
            Span("b", "forward", 0, 1, 2.0, 10.0),
        ],
    )
    assert t.lanes == ["a", "b"]  # in order of first use when not given
    assert t.duration == pytest.approx(10.0)
    assert t.busy("a") == pytest.approx(4.0) and t.busy("b") == pytest.approx(8.0) and t.busy("c") == 0.0
    assert t.utilisation() == pytest.approx({"a": 0.4, "b": 0.8})
    assert Timeline("empty", []).utilisation(["x"]) == {"x": 0.0}


def test_span_names() -> None:
    assert [Span("x", p, 3, 0, 0.0, 1.0).name for p in ("forward", "recompute", "backward", "copy")] == [
        "F3",
        "R3",
        "B3",
        "C3",
    ]
    assert Span("host", "other", -1, -1, 0.0, 1.0, "loss").name == "loss"
    assert Span("host", "other", -1, -1, 0.0, 1.0).name == "other"


# -- writing -------------------------------------------------------------------------------------------------------


def test_chrome_trace_has_a_named_thread_per_lane_in_order_and_complete_events_in_microseconds(tmp_path: Path) -> None:
    path = timeline.write_chrome_trace(_example(), tmp_path / "t.json")
    trace = json.loads(path.read_text())
    assert trace["displayTimeUnit"] == "ms"
    events = trace["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    order = {e["tid"]: e["args"]["sort_index"] for e in events if e["ph"] == "M" and e["name"] == "thread_sort_index"}
    assert [names[tid] for tid in sorted(names, key=lambda tid: order[tid])] == ["cpu:0", "cpu:1", "host"]
    lane = {name: tid for tid, name in names.items()}

    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == 6
    by_name: Dict[Tuple[str, str], Dict[str, object]] = {(names[e["tid"]], e["name"]): e for e in complete}
    f0 = by_name[("cpu:1", "F0")]
    assert f0["ts"] == pytest.approx(2000.0) and f0["dur"] == pytest.approx(3000.0)  # microseconds
    assert f0["args"] == {"phase": "forward", "micro_batch": 0, "partition": 1}
    assert by_name[("cpu:1", "R0")]["args"] == {"phase": "recompute", "micro_batch": 0, "partition": 1}
    assert by_name[("cpu:1", "B0")]["dur"] == pytest.approx(3000.0)
    optimizer = by_name[("host", "optimizer")]
    assert optimizer["tid"] == lane["host"] and optimizer["args"]["phase"] == "other"
    assert all(isinstance(e["pid"], int) and e["dur"] >= 0 for e in complete)
    other = trace["otherData"]
    assert other["source"] == "measured" and other["meta"] == {"chunks": 2}
    assert other["duration_ms"] == pytest.approx(12.0)
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_png_is_written_whole(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = timeline.write_png(_example(), tmp_path / "t.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    # Any timeline draws: empty, or one whose spans name a lane the list leaves out.
    timeline.write_png(Timeline("empty", [], ["cpu:0"]), tmp_path / "empty.png")
    timeline.write_png(Timeline("x", [Span("cuda:3", "copy", 0, 0, 0.0, 1e-6)], ["cuda:0"]), tmp_path / "x.png")
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    "given, base",
    [("t", "t"), ("t.png", "t"), ("t.json", "t"), ("run.v2", "run.v2"), ("sub/p2", "sub/p2")],
)
def test_one_path_names_both_files(tmp_path: Path, given: str, base: str) -> None:
    png, trace = timeline.paths(tmp_path / given)
    assert (png, trace) == (tmp_path / f"{base}.png", tmp_path / f"{base}.json")


def test_a_directory_holds_timeline_files_and_rows_get_their_own(tmp_path: Path) -> None:
    assert timeline.paths(tmp_path) == (tmp_path / "timeline.png", tmp_path / "timeline.json")
    assert timeline.paths(timeline.row_path(tmp_path / "t.png", "pipeline-2")) == (
        tmp_path / "t-pipeline-2.png",
        tmp_path / "t-pipeline-2.json",
    )
    assert timeline.row_path(tmp_path, "naive-1") == tmp_path / "timeline-naive-1"


def test_write_makes_both_files_and_a_missing_directory(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = timeline.write(_example(), tmp_path / "new" / "p2.json")
    assert written == [tmp_path / "new" / "p2.png", tmp_path / "new" / "p2.json"]
    assert all(p.stat().st_size > 0 for p in written)


def test_an_unwritable_path_is_a_harness_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for bad in (blocker / "t", blocker / "deeper" / "t"):
        with pytest.raises(HarnessError, match=r"cannot write the timeline to '.*file.*'.*writable directory"):
            timeline.check_writable(bad)
        with pytest.raises(HarnessError, match="cannot write the timeline"):
            timeline.write(_example(), bad)
    (tmp_path / "t.json").mkdir()
    with pytest.raises(HarnessError, match="is a directory"):
        timeline.check_writable(tmp_path / "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "t.json"]


# -- recording -----------------------------------------------------------------------------------------------------


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


# -- the command line ----------------------------------------------------------------------------------------------


def _speed(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(
        main,
        ["speed", "resnet101", "--profile", "quick", "--epochs", "2", "--skip-epochs", "1", "--batch-size", "8"]
        + ["--quiet", "--output", str(tmp_path / "out"), *args],
        env={"GPIPE_BENCH_CONFIGS": tiny_configs(tmp_path / "cfg")},
    )


def test_speed_writes_the_timeline_of_a_pipeline_row(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = _speed(
        tmp_path,
        "--pipeline",
        "2",
        "--chunks",
        "2",
        "--devices",
        "cpu:0,cpu:1",
        "--timeline",
        str(tmp_path / "tl" / "t"),
    )
    assert result.exit_code == 0, result.output
    png, trace = tmp_path / "tl" / "t.png", tmp_path / "tl" / "t.json"
    assert png.read_bytes().startswith(b"\x89PNG") and f"{png}, {trace}" in result.output
    events = json.loads(trace.read_text())["traceEvents"]
    lanes = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(lanes.values()) == ["cpu:0", "cpu:1", "host"]
    cells = {(lanes[e["tid"]], e["name"]) for e in events if e["ph"] == "X"}
    assert {(d, f"{p}{i}") for d in ("cpu:0", "cpu:1") for p in "FB" for i in range(2)} <= cells
    assert ("cpu:0", "R0") in cells and ("host", "optimizer") in cells  # except_last: micro-batch 0 recomputed
    assert [p.name for p in (tmp_path / "out").rglob("*.json")] == ["pipeline-2.json"]  # the record, unchanged


def test_speed_records_the_plain_model_of_naive_1(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = _speed(tmp_path, "--naive", "1", "--devices", "cpu", "--timeline", str(tmp_path / "n1.png"))
    assert result.exit_code == 0, result.output
    events = json.loads((tmp_path / "n1.json").read_text())["traceEvents"]
    assert sorted(e["name"] for e in events if e["ph"] == "X") == ["B0", "F0", "loss", "optimizer", "zero_grad"]
    assert (tmp_path / "n1.png").exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (
            ["--pipeline", "2", "--devices", "cpu:0,cpu:1", "--timeline", "{blocker}/t"],
            ["--timeline", "cannot write the timeline", "file"],
        ),
        (
            ["--pipeline", "2", "--engine", "torchgpipe", "--timeline", "{dir}/t"],
            ["--timeline", "pipeline-2", "torchgpipe", "gpipe-bench"],
        ),
        (
            ["--pipeline", "2", "--engine", "distributed", "--timeline", "{dir}/t"],
            ["--timeline", "distributed", "gpipe-bench"],
        ),
    ],
)
def test_speed_refuses_a_timeline_it_cannot_write_before_anything_runs(
    tmp_path: Path, args: List[str], needles: List[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _speed(tmp_path, *(a.format(blocker=blocker, dir=tmp_path / "tl") for a in args))
    one_line_error(result, *needles)
    assert not (tmp_path / "out").exists() and not (tmp_path / "tl").exists()
