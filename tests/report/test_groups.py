"""report/groups.py: results grouped by profile and machine, the newest record per row, speedups within a group."""

from __future__ import annotations

import dataclasses

from gpipe_bench import report
from gpipe_bench.report import groups
from gpipe_bench.report.format import DASH

from .builders import H100, P40, RESNET, blocks, make_table, resnet, result, speed_rows


def test_no_results_still_renders_the_rows() -> None:
    text = report.speed_table(resnet(), [])
    assert "no results yet" in text
    assert text.count("–") >= 5 * 2


def test_speedup_uses_the_baseline_of_the_same_hardware() -> None:
    table = resnet()
    results = [
        result(table, "naive-1", 100.0, env=P40),
        result(table, "pipeline-8", 400.0, env=P40),
        result(table, "naive-1", 1000.0, env=H100),
        result(table, "pipeline-8", 1500.0, env=H100),
        result(table, "pipeline-2", 150.0, env=H100),
        result(table, "naive-1", 50.0, env=P40, profile="quick"),  # same machine, other profile: not a baseline
        dataclasses.replace(result(table, "naive-1", 1.0), table="amoebanetd-speed"),  # another table: ignored
    ]
    text = report.speed_table(table, results, published=False)
    parts = blocks(text)
    headings = parts[0::2]
    assert len(parts) == 6  # published on H100, published on P40, quick on P40: published first, then by key
    assert "1x-nvidia-h100-80gb-hbm3 (published profile)" in headings[0]
    assert "8x-nvidia-tesla-p40 (published profile)" in headings[1]
    assert "8x-nvidia-tesla-p40 (quick profile)" in headings[2]
    assert "1× NVIDIA H100 80GB HBM3" in headings[0] and "torch 2.14.1" in headings[0]
    assert "8× Tesla P40" in headings[1] and "torch 1.3.0" in headings[1]
    h100, p40, quick = (
        dict((line.split()[0], line.split()[-1]) for line in grid.splitlines()[3:-1]) for grid in parts[1::2]
    )
    assert p40["pipeline-8"] == "4.000x" and p40["pipeline-2"] == "–"
    assert h100["pipeline-8"] == "1.500x" and h100["pipeline-2"] == "0.150x"
    assert quick["naive-1"] == "1.000x" and quick["pipeline-8"] == "–"


def test_newest_result_wins_and_other_engines_get_their_own_rows() -> None:
    table = resnet()
    results = [
        result(table, "naive-1", 100.0, created="2025-11-27T00:00:00+00:00"),
        result(table, "naive-1", 200.0, created="2025-11-28T00:00:00+00:00"),
        result(table, "pipeline-2", 300.0, created="2025-11-29T00:00:00+00:00"),
        result(table, "naive-1", 80.0, engine="torchgpipe"),
        result(table, "pipeline-2", 160.0, engine="torchgpipe"),
    ]
    heading, grid = blocks(report.speed_table(table, results, published=False))
    assert "2025-11-28 to 2025-11-29" in heading  # the replaced 11-27 record is gone
    names = [line[: line.index("  ")] for line in grid.splitlines()[3:-1]]
    assert names == [
        "naive-1",
        "naive-1 (torchgpipe)",
        "pipeline-1",
        "pipeline-2",
        "pipeline-2 (torchgpipe)",
        "pipeline-4",
        "pipeline-8",
    ]
    speedups = [line.split()[-1] for line in grid.splitlines()[3:-1]]
    assert speedups[3:5] == ["1.500x", "2.000x"]  # 300 / 200 ours, 160 / 80 torchgpipe's


def test_plain_model_baseline_is_shared_by_engines() -> None:
    """naive-1 is the plain model whatever engine recorded it; torchgpipe rows may use ours."""
    table = resnet()
    results = [result(table, "naive-1", 100.0), result(table, "pipeline-2", 150.0, engine="torchgpipe")]
    _, grid = blocks(report.speed_table(table, results, published=False))
    assert "pipeline-2 (torchgpipe)  150.000 samples/sec   1.500x" in grid


def test_the_newer_record_of_a_row_wins_by_time_not_by_text() -> None:
    """The newest record was chosen by comparing 'created' strings: wrong across time zones and DST."""
    table = make_table("resnet101-speed", speed_rows(RESNET))
    # 02:10 at UTC+02:00 is 00:10 UTC: older than 01:30 UTC, although its text sorts later.
    older = result(table, "pipeline-8", 111.0, created="2026-03-29T02:10:00+0200")
    newer = result(table, "pipeline-8", 222.0, created="2026-03-29T01:30:00+00:00")
    for records in ([older, newer], [newer, older]):
        text = report.render(table, records + [result(table, "naive-1", 100.0)])
        assert "222.000" in text and "111.000" not in text


def test_results_of_a_profile_the_config_lost_are_named_not_dropped() -> None:
    table = resnet()
    text = report.speed_table(table, [result(table, "naive-1", 1.0, profile="old")])
    assert "profile 'old' is not in configs/resnet101-speed.yaml" in text
    assert "profile 'old'" in report.compare(table, [result(table, "naive-1", 1.0, profile="old")]).text


def test_group_results_keeps_the_newest_record_per_row_and_engine_of_each_profile_and_machine() -> None:
    table = resnet()
    old = result(table, "naive-1", 90.0, created="2025-11-27T00:00:00+00:00")
    new = result(table, "naive-1", 100.0, created="2025-11-28T00:00:00+00:00")
    ours = result(table, "pipeline-2", 150.0)
    theirs = result(table, "pipeline-2", 160.0, engine="torchgpipe")
    quick = result(table, "naive-1", 50.0, profile="quick")
    h100 = result(table, "naive-1", 1000.0, env=H100)
    elsewhere = dataclasses.replace(result(table, "naive-1", 1.0), table="amoebanetd-speed")
    found = groups.group_results(table, [new, theirs, old, ours, quick, h100, elsewhere])
    assert [(g.profile, g.hardware) for g in found] == [
        ("published", "1x-nvidia-h100-80gb-hbm3"),
        ("published", "8x-nvidia-tesla-p40"),
        ("quick", "8x-nvidia-tesla-p40"),
    ]
    p40 = found[1]
    assert p40.results == {
        ("naive-1", "gpipe-bench"): new,
        ("pipeline-2", "gpipe-bench"): ours,
        ("pipeline-2", "torchgpipe"): theirs,
    }
    assert p40.engines() == ["gpipe-bench", "torchgpipe"] and found[0].engines() == ["gpipe-bench"]
    profile = table.profiles["published"]
    assert groups.baseline_result(table, profile, p40, "torchgpipe") is new  # the plain model is every engine's
    assert groups.speedup_of(table, profile, p40, ours) == 1.5
    assert groups.speedup_of(table, profile, p40, theirs) == 1.6
    assert groups.speedup_of(table, profile, found[0], found[0].get("naive-1", "gpipe-bench")) == 1.0
    assert groups.speedup_of(table, profile, found[0], None) is None
    slots = [(row.name, engine, record) for row, engine, record in groups.row_slots(profile, p40)]
    assert slots == [
        ("naive-1", "gpipe-bench", new),
        ("pipeline-1", "gpipe-bench", None),
        ("pipeline-2", "gpipe-bench", ours),
        ("pipeline-2", "torchgpipe", theirs),
        ("pipeline-4", "gpipe-bench", None),
        ("pipeline-8", "gpipe-bench", None),
    ]
    assert groups.group_results(table, []) == [groups.Group("published", None)]


def test_measured_over_ideal_and_the_device_count_it_needs() -> None:
    rows = resnet().profiles["published"].rows
    assert groups.of_ideal_cell(rows[4], 4.367) == "0.81 of 5.41x"  # perf.ideal_speedup of pipeline-8
    assert groups.of_ideal_cell(rows[0], 1.0) == DASH  # one device: no ideal
    assert groups.of_ideal_cell(rows[4], None) == DASH
    two = result(resnet(), "pipeline-2", 1.0, extra={"processes": 2})
    assert groups.on_row_devices(rows[2], two) and groups.on_row_devices(rows[2], None)
    assert not groups.on_row_devices(rows[4], two)  # eight stages on two processes: not the row's devices


def test_a_precision_is_a_group_of_its_own_and_its_heading_says_so() -> None:
    """A bf16 row is never divided by the fp32 baseline: speedups stay within one precision."""
    table = resnet()

    def bf16(experiment: str, value: float) -> object:
        made = result(table, experiment, value, env=H100)
        made.settings["precision"] = "bf16"
        return made

    results = [
        result(table, "naive-1", 1000.0, env=H100),
        result(table, "pipeline-2", 1500.0, env=H100),
        bf16("pipeline-2", 2400.0),
    ]
    parts = blocks(report.speed_table(table, results, published=False))  # type: ignore[arg-type]
    headings = parts[0::2]
    assert len(parts) == 4
    assert "(published profile):" in headings[0] and "(published profile, bf16):" in headings[1]
    fp32, half = (dict((line.split()[0], line.split()[-1]) for line in grid.splitlines()[3:-1]) for grid in parts[1::2])
    assert fp32["pipeline-2"] == "1.500x"
    assert half["pipeline-2"] == DASH  # no bf16 baseline measured: no speedup
