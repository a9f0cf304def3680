"""report/compare.py: ours against the published figures, row by row, with flags and the regressions."""

from __future__ import annotations

import math

import pytest

from gpipe_bench import report

from .builders import amoeba, as_published, memory, resnet, result, row_of


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


def test_compare_quick_profile_differs_but_never_regresses() -> None:
    """Scaled-down rows on other hardware are reported, not failed by `compare --check`."""
    table = resnet()
    results = [
        result(table, "naive-1", 100.0, profile="quick"),
        result(table, "pipeline-4", 100.0 * 2.629 * 0.5, profile="quick"),
    ]
    comparison = report.compare(table, results)
    assert row_of(comparison, "pipeline-4").flag == "differs"
    assert comparison.regressions == []
    assert "not comparable with the published hardware" in comparison.text


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
