"""timeline.files: the Chrome trace and the PNG of a step, and their paths (one ``--timeline PATH``, rows apart)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import pytest

from gpipe_bench.errors import HarnessError
from gpipe_bench.timeline import files
from gpipe_bench.timeline.model import Span, Timeline


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


def test_chrome_trace_has_a_named_thread_per_lane_in_order_and_complete_events_in_microseconds(tmp_path: Path) -> None:
    path = files.write_chrome_trace(_example(), tmp_path / "t.json")
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
    path = files.write_png(_example(), tmp_path / "t.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    # Any timeline draws: empty, or one whose spans name a lane the list leaves out.
    files.write_png(Timeline("empty", [], ["cpu:0"]), tmp_path / "empty.png")
    files.write_png(Timeline("x", [Span("cuda:3", "copy", 0, 0, 0.0, 1e-6)], ["cuda:0"]), tmp_path / "x.png")
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    "given, base",
    [("t", "t"), ("t.png", "t"), ("t.json", "t"), ("run.v2", "run.v2"), ("sub/p2", "sub/p2")],
)
def test_one_path_names_both_files(tmp_path: Path, given: str, base: str) -> None:
    png, trace = files.paths(tmp_path / given)
    assert (png, trace) == (tmp_path / f"{base}.png", tmp_path / f"{base}.json")


def test_a_directory_holds_timeline_files_and_rows_get_their_own(tmp_path: Path) -> None:
    assert files.paths(tmp_path) == (tmp_path / "timeline.png", tmp_path / "timeline.json")
    assert files.paths(files.row_path(tmp_path / "t.png", "pipeline-2")) == (
        tmp_path / "t-pipeline-2.png",
        tmp_path / "t-pipeline-2.json",
    )
    assert files.row_path(tmp_path, "naive-1") == tmp_path / "timeline-naive-1"


def test_write_makes_both_files_and_a_missing_directory(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = files.write(_example(), tmp_path / "new" / "p2.json")
    assert written == [tmp_path / "new" / "p2.png", tmp_path / "new" / "p2.json"]
    assert all(p.stat().st_size > 0 for p in written)


def test_an_unwritable_path_is_a_harness_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for bad in (blocker / "t", blocker / "deeper" / "t"):
        with pytest.raises(HarnessError, match=r"cannot write the timeline to '.*file.*'.*writable directory"):
            files.check_writable(bad)
        with pytest.raises(HarnessError, match="cannot write the timeline"):
            files.write(_example(), bad)
    (tmp_path / "t.json").mkdir()
    with pytest.raises(HarnessError, match="is a directory"):
        files.check_writable(tmp_path / "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "t.json"]
