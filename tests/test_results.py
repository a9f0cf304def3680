"""Result records: JSON round trip, atomic writes, the path layout, hardware keys, loading."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import pytest

import gpipe_bench
from gpipe_bench import results
from gpipe_bench.errors import HarnessError
from gpipe_bench.results import Result
from helpers import EPYC, P40


def make(
    experiment: str = "pipeline-2",
    *,
    table: str = "resnet101-speed",
    profile: str = "published",
    engine: str = "gpipe-bench",
    env: Dict[str, Any] = EPYC,
    value: float = 137.788,
    **kwargs: Any,
) -> Result:
    samples = kwargs.pop("samples", [value - 1.0, value, value + 1.0])
    return Result(
        table=table,
        experiment=experiment,
        profile=profile,
        engine=engine,
        kind="speed",
        metric="throughput",
        unit="samples/sec",
        value=value,
        status="ok",
        samples=samples,
        spread=results.summarize(samples),
        settings={"batch": 4096, "chunks": 256, "balance": [140, 230]},
        environment=dict(env),
        extra=kwargs.pop("extra", {}),
        created="2025-11-28T03:00:00+00:00",
        **kwargs,
    )


def leftovers(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir())


# -- the record ----------------------------------------------------------------------------------------------------


def test_json_round_trip_through_disk(tmp_path: Path) -> None:
    result = make(extra={"note": "ünïcode", "nested": {"a": [1, 2.5, None]}})
    results.save(result, tmp_path)
    assert results.load_all(tmp_path) == [result]
    assert Result.from_json(result.to_json()) == result


def test_file_is_pretty_sorted_json_with_trailing_newline(tmp_path: Path) -> None:
    path = results.save(make(), tmp_path)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and not text.endswith("\n\n")
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert data["schema"] == results.SCHEMA


def test_path_layout(tmp_path: Path) -> None:
    ours = make("pipeline-8")
    theirs = make("pipeline-8", engine="torchgpipe")
    key = ours.hardware_key()
    assert results.path_for(ours, tmp_path) == tmp_path / "resnet101-speed" / "published" / key / "pipeline-8.json"
    assert results.path_for(theirs, tmp_path).name == "pipeline-8--torchgpipe.json"
    assert results.save(ours, tmp_path) == results.path_for(ours, tmp_path)


def test_a_row_run_in_another_precision_never_replaces_the_rows_record(tmp_path: Path) -> None:
    fp32 = make("pipeline-2")
    bf16 = make("pipeline-2", value=200.0)
    bf16.settings["precision"] = "bf16"
    distributed = make("pipeline-2", engine="distributed-gpipe")
    distributed.settings["precision"] = "bf16"
    assert fp32.precision == "fp32"  # records made before precisions were recorded ran in fp32
    assert results.path_for(bf16, tmp_path).name == "pipeline-2--bf16.json"
    assert results.path_for(distributed, tmp_path).name == "pipeline-2--distributed-gpipe--bf16.json"
    for result in (fp32, bf16):
        results.save(result, tmp_path)
    assert sorted(r.value for r in results.load_all(tmp_path)) == [137.788, 200.0]


def test_a_run_with_settings_of_its_own_never_replaces_the_rows_record(tmp_path: Path) -> None:
    row = make("pipeline-2")
    own = make("pipeline-2", value=150.0)
    own.settings.update(
        balance=[192, 178], checkpoint="never", overrides={"checkpoint": "never", "balance": [192, 178]}
    )
    assert row.overrides == {} and own.overrides == {"checkpoint": "never", "balance": [192, 178]}
    assert results.path_for(own, tmp_path).name == "pipeline-2--balance192-178-checkpoint-never.json"
    own.settings["precision"] = "bf16"
    assert results.path_for(own, tmp_path).name == "pipeline-2--bf16--balance192-178-checkpoint-never.json"
    for result in (row, own):
        results.save(result, tmp_path)
    assert sorted(r.value for r in results.load_all(tmp_path)) == [137.788, 150.0]


def test_settings_tag_and_label_are_deterministic_and_readable() -> None:
    changed = {"devices": 1, "epochs": 2, "checkpoint": "except_last", "balance": [1, 2, 3], "chunks": 4, "batch": 8}
    assert results.settings_tag(changed) == "batch8-chunks4-balance1-2-3-checkpoint-except_last-epochs2-devices1"
    assert results.settings_label(changed) == (
        "batch 8, chunks 4, balance 1,2,3, checkpoint except_last, epochs 2, devices 1"
    )
    assert results.settings_tag({}) == "" and results.settings_label({}) == ""


def test_a_record_made_before_overrides_were_recorded_loads_as_its_rows() -> None:
    data = make().to_json()
    assert "overrides" not in data["settings"]
    assert Result.from_json(data).overrides == {}


def test_path_refuses_components_that_escape_the_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsafe path component"):
        results.path_for(make("../../etc/x"), tmp_path)


def test_summarize() -> None:
    assert results.summarize([]) == {}
    assert results.summarize([3.0]) == {"min": 3.0, "max": 3.0, "median": 3.0, "std": 0.0}
    spread = results.summarize([1.0, 2.0, 6.0])
    assert (spread["min"], spread["max"], spread["median"]) == (1.0, 6.0, 2.0)
    assert spread["std"] == pytest.approx(2.6457513)


# -- atomic writes -------------------------------------------------------------------------------------------------


def test_unserialisable_record_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        results.save(make(extra={"bad": object()}), tmp_path)
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.tmp"))


def test_failed_rewrite_keeps_the_old_record_whole(tmp_path: Path) -> None:
    path = results.save(make(value=1.0), tmp_path)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        results.save(make(value=float("nan")), tmp_path)  # NaN is not JSON
    assert path.read_bytes() == before
    assert leftovers(path.parent) == [path.name]


def test_failure_mid_write_removes_the_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = results.save(make(value=1.0), tmp_path)
    before = path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(HarnessError, match="No space left on device"):
        results.save(make(value=2.0), tmp_path)
    assert path.read_bytes() == before
    assert leftovers(path.parent) == [path.name]


def test_interrupt_mid_write_removes_the_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        results.save(make(), tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_unwritable_directory_is_a_one_line_usage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the results directory should be\n")
    with pytest.raises(HarnessError) as caught:
        results.save(make(), blocker)
    message = caught.value.message
    assert "\n" not in message
    assert str(blocker) in message
    assert "choose a writable directory" in message


def test_read_only_directory_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: these tests may run as root, whom chmod does not stop.
    def denied(**kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(kwargs["dir"]))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(HarnessError) as caught:
        results.save(make(), tmp_path)
    message = caught.value.message
    assert "Permission denied" in message and str(tmp_path) in message and "\n" not in message
    assert not list(tmp_path.rglob("*.json"))


def test_results_dir_default_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPIPE_BENCH_RESULTS", raising=False)
    assert results.results_dir() == Path(gpipe_bench.__file__).resolve().parent.parent / "results"
    monkeypatch.setenv("GPIPE_BENCH_RESULTS", str(tmp_path / "elsewhere"))
    assert results.results_dir() == tmp_path / "elsewhere"
    path = results.save(make())
    assert path.is_relative_to(tmp_path / "elsewhere")


# -- loading -------------------------------------------------------------------------------------------------------


def test_load_all_filters(tmp_path: Path) -> None:
    records = [
        make("naive-1"),
        make("pipeline-2"),
        make("pipeline-2", engine="torchgpipe"),
        make("pipeline-2", profile="quick"),
        make("pipeline-2", env=P40),
        make("pipeline-2", table="amoebanetd-speed"),
    ]
    for record in records:
        results.save(record, tmp_path)
    assert len(results.load_all(tmp_path)) == len(records)
    assert {r.table for r in results.load_all(tmp_path, table="amoebanetd-speed")} == {"amoebanetd-speed"}
    assert len(results.load_all(tmp_path, table="resnet101-speed", profile="published")) == 4
    on_p40 = results.load_all(tmp_path, hardware="8x-nvidia-tesla-p40")
    assert [r.environment["gpus"] for r in on_p40] == [["Tesla P40"] * 8]
    assert (
        len(results.load_all(tmp_path, table="resnet101-speed", profile="quick", hardware="cpu-2-amd-epyc-7b13")) == 1
    )
    assert results.load_all(tmp_path, table="no-such-table") == []


def test_load_all_skips_junk_and_says_so_once_per_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = make()
    results.save(good, tmp_path)
    junk: Dict[str, Union[str, bytes]] = {
        "broken.json": "{not json",
        "list.json": "[1, 2, 3]",
        "other/package.json": json.dumps({"name": "x", "version": "1.0"}),
        "typed.json": json.dumps({**good.to_json(), "value": "fast"}),
        "status.json": json.dumps({**good.to_json(), "status": "great"}),
        "future.json": json.dumps({**good.to_json(), "schema": results.SCHEMA + 1}),
        "binary.json": b"\xff\xfe\x00",
    }
    for name, content in junk.items():
        path = tmp_path / "deep" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    (tmp_path / "notes.txt").write_text("ignored: not *.json\n")
    skipped: List[Tuple[Path, str]] = []
    assert results.load_all(tmp_path, on_skip=lambda path, reason: skipped.append((path, reason))) == [good]
    assert sorted(path.name for path, _ in skipped) == sorted(Path(name).name for name in junk)
    assert any("newer" in reason for _, reason in skipped)
    # The library prints nothing: the command line turns each skip into a warning line.
    assert results.load_all(tmp_path) == [good]
    assert capsys.readouterr().err == ""


def test_load_all_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    assert results.load_all(tmp_path / "nothing-here") == []


def test_results_go_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results were written beside the package, which a non-editable install cannot (or must not) take."""
    monkeypatch.delenv("GPIPE_BENCH_RESULTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert results.results_dir() == tmp_path / "results"
    path = results.save(make())
    assert path.is_relative_to(tmp_path / "results")
    monkeypatch.setenv("GPIPE_BENCH_RESULTS", str(tmp_path / "elsewhere"))
    assert results.results_dir() == tmp_path / "elsewhere"
