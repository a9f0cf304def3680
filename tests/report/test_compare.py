"""report/compare.py: ours against the published figures, row by row, with flags and the regressions."""

from __future__ import annotations

import dataclasses
import math

import pytest

from gpipe_bench import perf, report
from gpipe_bench.config import Published, Row

from .builders import amoeba, as_published, make_table, memory, resnet, result, row_of


def test_compare_measured_over_ideal_with_31_microbatches() -> None:
    table = amoeba()
    comparison = report.compare(table, as_published(table))
    entry = row_of(comparison, "pipeline-8")
    ideal = 8 * 31 / 38 * 0.75
    assert entry.micro_batches == 31
    assert entry.ideal == pytest.approx(ideal)
    assert entry.speedup == pytest.approx(34.392 / 14.188)
    assert entry.of_ideal == pytest.approx(34.392 / 14.188 / ideal)
    assert entry.published_of_ideal == pytest.approx(2.424 / ideal)
    assert row_of(comparison, "naive-2").ideal is None
    assert f"0.50 of {ideal:.2f}x" in comparison.text


def test_compare_flags_by_tolerance() -> None:
    table = resnet()  # tolerance 10%
    results = [
        result(table, "naive-1", 100.0),
        result(table, "pipeline-2", 100.0 * 1.489 * 0.95),  # 5% slower than published: ok
        result(table, "pipeline-4", 100.0 * 2.629 * 0.8),  # 20% slower: regression
        result(table, "pipeline-8", 100.0 * 4.367 * 1.2),  # 20% faster: better
    ]
    comparison = report.compare(table, results)
    flags = {e.experiment: e.flag for e in comparison.rows}
    assert flags == {
        "naive-1": "ok",
        "pipeline-1": "missing",
        "pipeline-2": "ok",
        "pipeline-4": "regression",
        "pipeline-8": "better",
    }
    assert row_of(comparison, "pipeline-4").ratio == pytest.approx(0.8)
    assert len(comparison.regressions) == 1 and "pipeline-4" in comparison.regressions[0]
    assert "\n" not in comparison.regressions[0]
    flag_lines = comparison.text.split("Flags:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(flag_lines) == 3
    assert any("pipeline-1 [missing]" in line for line in flag_lines)
    assert any("pipeline-4 [regression]" in line and "2.103x vs published 2.629x" in line for line in flag_lines)
    assert any("pipeline-8 [better]" in line for line in flag_lines)


def test_another_profile_is_not_compared_row_by_row_and_says_why_once() -> None:
    """Scaled-down rows on other hardware are shown beside the published shape, never flagged or failed."""
    table = resnet()
    results = [
        result(table, "naive-1", 100.0, profile="quick"),
        result(table, "pipeline-4", 100.0 * 2.629 * 0.5, profile="quick"),
    ]
    comparison = report.compare(table, results)
    assert row_of(comparison, "pipeline-4").flag == "not compared"
    assert row_of(comparison, "pipeline-1").flag == "missing"
    assert comparison.regressions == []
    text = comparison.text
    assert "[differs]" not in text and "[missing]" not in text  # no flag per row
    [why] = [line for line in text.splitlines() if "not compared" in line.lower()]
    assert why.startswith("Not compared row by row: the quick profile runs")
    assert "Ratio" not in text.split("Flags:")[0] and "- none: no row compared with the published figures" in text


def test_each_ideal_belongs_to_the_settings_its_speedup_was_measured_with() -> None:
    """The published speedup was divided by the quick profile's ideal ('Published / ideal 1.24 of 1.20x')."""
    published = resnet()
    quick_rows = [
        dataclasses.replace(r, batch=64, chunks=4) if r.mode == "pipeline" else r
        for r in published.profile("published").rows
    ]
    table = make_table("resnet101-speed", published.profile("published").rows, quick_rows=quick_rows)
    results = [result(table, "naive-1", 100.0, profile="quick"), result(table, "pipeline-2", 60.0, profile="quick")]
    entry = row_of(report.compare(table, results), "pipeline-2")
    quick_ideal = perf.ideal_speedup("pipeline", 2, 64, 4, "except_last")
    published_ideal = perf.ideal_speedup("pipeline", 2, 4096, 256, "except_last")
    assert entry.ideal == pytest.approx(quick_ideal) and entry.of_ideal == pytest.approx(0.6 / quick_ideal)
    assert entry.published_ideal == pytest.approx(published_ideal)
    assert entry.published_of_ideal == pytest.approx(1.489 / published_ideal)
    text = report.compare(table, results).text
    assert f"{1.489 / published_ideal:.2f} of {published_ideal:.2f}x" in text


def test_accuracy_of_another_profile_compares_the_gap_between_pipeline_and_data_parallel() -> None:
    rows = [
        Row("dataparallel-256", "dataparallel", 8, 256, 1, None, "never", {}, Published({"top1_error": 22.02}), ""),
        Row("pipeline-256", "pipeline", 2, 256, 4, (1, 2), "except_last", {}, Published({"top1_error": 21.99}), ""),
    ]
    table = make_table("resnet101-accuracy", rows, kind="accuracy")
    results = [
        result(table, "dataparallel-256", 11.5, profile="quick", samples=[11.4, 11.6]),
        result(table, "pipeline-256", 11.8, profile="quick", samples=[11.7, 11.9]),
    ]
    text = report.compare(table, results).text
    line = next(x for x in text.splitlines() if x.startswith("pipeline-256"))
    assert line.split() == ["pipeline-256", "11.80", "+0.30", "points", "21.99", "-0.03", "points"]
    assert "22.02" not in text.split("Flags:")[1]  # the error is never set against ImageNet's


def test_compare_lower_is_better_and_failed_runs() -> None:
    table = memory()  # peak activation memory: lower is better
    results = [
        result(table, "naive-1", None, status="oom"),  # nothing published either: ok
        result(table, "pipeline-1", 6.64 * 1.5),  # 50% more memory: regression
        result(table, "pipeline-2", 11.31 * 0.5),  # half: better
        result(table, "pipeline-4", None, status="oom"),  # published a figure, we ran out: regression
        result(table, "pipeline-8", None, status="error"),
    ]
    comparison = report.compare(table, results)
    flags = {e.experiment: e.flag for e in comparison.rows}
    assert flags == {
        "naive-1": "ok",
        "pipeline-1": "regression",
        "pipeline-2": "better",
        "pipeline-4": "regression",
        "pipeline-8": "missing",
    }
    assert row_of(comparison, "pipeline-8").note == "run error"


def test_compare_without_a_baseline_is_missing_not_ok() -> None:
    table = resnet()
    entry = row_of(report.compare(table, [result(table, "pipeline-2", 150.0)]), "pipeline-2")
    assert entry.flag == "missing" and "baseline naive-1" in entry.note


def test_compare_with_no_results_lists_every_row_missing() -> None:
    comparison = report.compare(resnet(), [])
    assert [e.flag for e in comparison.rows] == ["missing"] * 5
    assert comparison.regressions == []


def test_parameter_counts_that_differ_from_the_published_are_noted() -> None:
    table = memory()
    results = [result(table, "pipeline-1", 6.64, extra={"parameters": 300_000_000})]
    entry = row_of(report.compare(table, results), "pipeline-1")
    assert "300,000,000 parameters, published 358M" in entry.note
    ok = [result(table, "pipeline-1", 6.64, extra={"parameters": 358_456_186})]
    assert "parameters" not in row_of(report.compare(table, ok), "pipeline-1").note


def test_compare_markdown_and_text_layout() -> None:
    table = resnet()
    comparison = report.compare(table, as_published(table), fmt="md")
    assert "| Experiment" in comparison.text
    assert comparison.text.endswith("\n") and not math.isnan(row_of(comparison, "pipeline-8").ratio)


def test_a_run_with_settings_of_its_own_is_never_compared_with_its_rows_published_figures() -> None:
    table = resnet()
    slow = 100.0 * 1.489 * 0.5  # far below the published speedup: a regression, were it the row
    own = result(table, "pipeline-2", slow, overrides={"balance": [192, 178], "checkpoint": "never"})
    results = [result(table, "naive-1", 100.0), result(table, "pipeline-2", 100.0 * 1.489), own]
    comparison = report.compare(table, results)
    assert row_of(comparison, "pipeline-2").flag == "ok"
    [apart] = [e for e in comparison.rows if e.overrides]
    assert apart.label == "pipeline-2 [balance 192,178, checkpoint never]"
    assert apart.flag == "not compared" and apart.published is None and apart.published_speedup is None
    assert apart.ratio is None and apart.ideal == pytest.approx(2 * 256 / 257)  # its own settings' ideal
    assert comparison.regressions == []
    line = next(x for x in comparison.text.splitlines() if x.startswith("pipeline-2 [balance 192,178"))
    assert "137.788" not in line and "1.489x" not in line
