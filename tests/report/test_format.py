"""report/format.py: how every table writes its cells (figures, dashes, units, statuses) and lays out its grid."""

from __future__ import annotations

import dataclasses
import math

import pytest

from gpipe_bench import report
from gpipe_bench.report.format import (
    DASH,
    abbrev,
    as_float,
    fmt_num,
    join_blocks,
    lf_label,
    mean_std,
    memory_cell,
    published_value,
    render_grid,
    seed_stats,
    status_cell,
)

from .builders import blocks, memory, resnet, result


def test_missing_rows_are_dashes_and_failures_say_so() -> None:
    table = resnet()
    results = [
        result(table, "naive-1", 100.0),
        result(table, "pipeline-2", None, status="oom"),
        result(table, "pipeline-4", None, status="interrupted"),
    ]
    _, grid = blocks(report.speed_table(table, results, published=False))
    cells = {line.split()[0]: line.split()[1:] for line in grid.splitlines()[3:-1]}
    assert cells["pipeline-1"] == ["–", "–"]
    assert cells["pipeline-2"] == ["Out", "of", "memory", "–"]
    assert cells["pipeline-4"] == ["interrupted", "–"]
    assert cells["pipeline-8"] == ["–", "–"]


def test_format_gib_switches_to_mib_below_one_gib() -> None:
    assert report.format_gib(6.85) == "6.85 GiB"
    assert report.format_gib(0.0248) == "25.4 MiB"
    assert report.format_gib(None) == "–"


def test_render_grid_lays_out_the_published_rst_and_github_markdown() -> None:
    """RST as published: headers left over right-aligned figures, no padding past the widest cell; md: GitHub's."""
    headers, rows, aligns = ["Name", "Value"], [["a", "1.000"], ["bbb", "22.5"]], ["left", "right"]
    assert render_grid(headers, rows, aligns, "rst") == (
        "====  =====\nName  Value\n====  =====\na     1.000\nbbb    22.5\n====  ====="
    )
    assert render_grid(headers, rows, aligns, "md") == (
        "| Name   |   Value |\n|--------|---------|\n| a      |   1.000 |\n| bbb    |    22.5 |"
    )
    with pytest.raises(ValueError, match="unknown table format 'html'; use one of rst, md"):
        render_grid(headers, rows, aligns, "html")


def test_cells_write_figures_counts_and_statuses_one_way() -> None:
    table = memory()
    assert fmt_num(1.23456, 3, "x") == "1.235x" and fmt_num(2, 2, " GiB") == "2.00 GiB"
    assert [fmt_num(v, 2) for v in (None, True, "1.0", math.nan, math.inf)] == [DASH] * 5
    assert [abbrev(n) for n in (89_745_302, 2_005_905_418, 1_500_000, 25_000)] == ["90M", "2.01B", "1.50M", "25K"]
    assert abbrev(None) == abbrev(True) == abbrev(1.5e6) == DASH
    assert as_float(3) == 3.0 and as_float(False) is None and as_float("3") is None
    # the memory table's metric is printed under another key: the published value is found through it
    pipeline_2 = table.profiles["published"].rows[2]
    assert published_value(table, pipeline_2) == 11.31
    assert (
        lf_label(table, pipeline_2) == "(6, 544)" and lf_label(resnet(), resnet().profiles["published"].rows[0]) == DASH
    )
    ok = result(table, "pipeline-2", 11.5)
    assert status_cell(ok, lambda v: f"{v:.1f}") == "11.5"
    assert status_cell(result(table, "pipeline-2", None, status="oom"), str) == "Out of memory"
    assert status_cell(result(table, "pipeline-2", None, status="error"), str) == "error"
    assert status_cell(result(table, "pipeline-2", None), str) == "--"  # ok, but no figure
    assert status_cell(None, str) == DASH
    assert memory_cell(result(table, "pipeline-8", None, status="predicted")) == "not measured"
    assert memory_cell(ok) == "11.50 GiB"
    assert join_blocks(["a", "", "b"]) == "a\n\nb\n"


def test_mean_std_of_the_seeds() -> None:
    table = memory()
    seeds = result(table, "pipeline-2", 22.02, samples=[21.91, 22.02, 22.13])
    mean, std, n = seed_stats(seeds)
    assert (mean, std, n) == (pytest.approx(22.02), pytest.approx(0.11), 3)
    assert mean_std(seeds) == "22.02±0.11"
    assert mean_std(result(table, "pipeline-2", 21.5, samples=[21.5])) == "21.50±0.00"  # one seed: no spread
    assert mean_std(dataclasses.replace(seeds, samples=[], value=21.0)) == "21.00"
    assert mean_std(dataclasses.replace(seeds, samples=[], value=None)) == "--"
