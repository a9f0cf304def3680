"""timeline.model: spans, a step's duration, each lane's busy time; and the package's split.

The package imports its model eagerly and the writers and the recorder on first
access, so that the simulator, which needs only the model, imports neither.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import gpipe_bench.timeline as timeline
from gpipe_bench.timeline import files, model, recorder
from gpipe_bench.timeline.model import Span, Timeline


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


# -- the package ---------------------------------------------------------------------------------------------------


def test_importing_the_model_imports_neither_the_recorder_nor_the_writers_nor_the_engine() -> None:
    code = (
        "import sys, gpipe_bench.timeline.model; "
        "print(sorted(m for m in ('gpipe_bench.timeline.recorder', 'gpipe_bench.timeline.files', "
        "'gpipe_bench.pipe', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_package_still_offers_every_public_name_from_its_submodule() -> None:
    from gpipe_bench.timeline import TimelineRecorder, write

    assert write is files.write and TimelineRecorder is recorder.TimelineRecorder
    owner = {"PHASES": model, "Span": model, "Timeline": model, "TimelineRecorder": recorder}
    for name in timeline.__all__:
        assert getattr(timeline, name) is getattr(owner.get(name, files), name)
    assert set(timeline.__all__) <= set(dir(timeline))
    with pytest.raises(AttributeError, match="no_such_name"):
        timeline.no_such_name  # noqa: B018
