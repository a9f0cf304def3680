"""measure/runner.py: records saved as rows finish; Ctrl-C keeps what was saved and says where it stopped."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import pytest

from gpipe_bench import config
from gpipe_bench.errors import HarnessError
from gpipe_bench.jobs import Job
from gpipe_bench.measure.runner import RowInterrupted, run_rows
from gpipe_bench.results import Result, load_all, summarize

TABLE = config.load("resnet101-speed")


def _jobs() -> List[Job]:
    return [
        Job(TABLE, row, TABLE.profile("quick").settings, "quick", ["cpu"]) for row in TABLE.profile("quick").rows[:3]
    ]


def _record(job: Job) -> Result:
    return Result(
        table=TABLE.name,
        experiment=job.row.name,
        profile="quick",
        engine="gpipe-bench",
        kind="speed",
        metric="throughput",
        unit="samples/sec",
        value=1.0,
        status="ok",
        samples=[1.0],
        spread=summarize([1.0]),
        environment={"usable_cores": 2, "cpu_model": "test"},
    )


def test_each_row_is_saved_when_it_finishes(tmp_path: Path) -> None:
    seen: List[str] = []
    done = run_rows(
        _jobs(), _record, tmp_path, before=lambda j: seen.append(j.row.name), after=lambda j, r, p: seen.append(p.name)
    )
    assert [r.experiment for r in done] == ["naive-1", "naive-2", "pipeline-1"]
    assert seen == ["naive-1", "naive-1.json", "naive-2", "naive-2.json", "pipeline-1", "pipeline-1.json"]
    assert len(load_all(tmp_path)) == 3


def test_without_a_results_directory_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """memory --predict-only: predictions are shown, never saved among this host's measurements."""
    monkeypatch.chdir(tmp_path)
    told: List[Optional[Path]] = []
    done = run_rows(_jobs(), _record, None, after=lambda j, r, p: told.append(p))
    assert [r.experiment for r in done] == ["naive-1", "naive-2", "pipeline-1"]
    assert told == [None, None, None] and list(tmp_path.iterdir()) == []


def test_ctrl_c_keeps_the_saved_rows(tmp_path: Path) -> None:
    def measure(job: Job) -> Optional[Result]:
        if job.row.name == "pipeline-1":
            error = KeyboardInterrupt()
            error.completed_epochs = 1  # type: ignore[attr-defined]
            raise error
        return _record(job)

    with pytest.raises(RowInterrupted) as caught:
        run_rows(_jobs(), measure, tmp_path)
    assert caught.value.job.row.name == "pipeline-1" and caught.value.saved == 2
    assert caught.value.completed_epochs == 1
    assert sorted(r.experiment for r in load_all(tmp_path)) == ["naive-1", "naive-2"]


def test_other_ranks_save_nothing(tmp_path: Path) -> None:
    assert run_rows(_jobs(), lambda job: None, tmp_path / "never", writer=False) == []
    assert not (tmp_path / "never").exists()


def test_an_unwritable_directory_fails_before_any_row(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HarnessError, match="cannot write"):
        run_rows(_jobs(), lambda job: pytest.fail("must not run"), blocker)
