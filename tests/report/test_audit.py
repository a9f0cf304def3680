"""report/audit.py: the published data checked against itself (speedups against throughputs, memory against parameters)."""

from __future__ import annotations

import dataclasses
from typing import List

import pytest

from gpipe_bench import report
from gpipe_bench.report import audit
from gpipe_bench.report.audit import count_interval

from .builders import SLIP, amoeba, as_published, memory, resnet


def test_published_seed_speed_tables_are_consistent() -> None:
    for table in (resnet(), amoeba()):
        comparison = report.compare(table, as_published(table))
        assert comparison.inconsistencies == []
        assert comparison.regressions == []
        assert {e.flag for e in comparison.rows} == {"ok"}
        assert "Published data:\n- consistent" in comparison.text


def test_published_speedup_that_does_not_follow_the_throughputs_is_reported() -> None:
    table = resnet(pipeline_4={"speedup": 2.700})
    comparison = report.compare(table, [])
    assert len(comparison.inconsistencies) == 1
    line = comparison.inconsistencies[0]
    assert "pipeline-4" in line and "2.700x" in line and "243.322 / baseline naive-1 92.539 = 2.629x" in line
    assert line in comparison.text


def test_published_rounding_is_not_an_inconsistency() -> None:
    # 1.511 / 2.000 = 0.7555: a printed 0.755 and 0.756 both follow from the printed throughputs; 0.757 does not.
    def slips(speedup: float) -> List[str]:
        table = resnet(naive_1={"throughput": 2.0}, pipeline_1={"throughput": 1.511, "speedup": speedup})
        return [line for line in report.compare(table, []).inconsistencies if " pipeline-1:" in line]

    assert slips(0.755) == [] and slips(0.756) == []
    assert len(slips(0.757)) == 1 and slips(0.754) != []


def test_published_model_memory_slip_is_flagged() -> None:
    comparison = report.compare(memory(), [])
    assert len(comparison.inconsistencies) == 1
    line = comparison.inconsistencies[0]
    assert "pipeline-2" in line and "6.45GB" in line and "6.85 GiB" in line and SLIP in line
    assert line in comparison.text
    # The rule itself, for the record: 613M x 4 bytes x 3 in GiB.
    assert 613e6 * 12 / 2**30 == pytest.approx(6.85, abs=0.005)


def test_a_printed_count_stands_for_every_count_that_rounds_to_it() -> None:
    assert count_interval("1.16B") == (1.155e9, 1.16e9, 1.165e9)  # ± half the last printed digit
    assert count_interval("90M") == (89.5e6, 90e6, 90.5e6)
    assert count_interval(" 25 k ") == (24_500.0, 25_000.0, 25_500.0)
    assert count_interval(358_456_186) == (358_456_186.0,) * 3  # counted, not printed: exact
    assert count_interval("lots") is None and count_interval(True) is None and count_interval(None) is None


def test_the_memory_rule_follows_the_profile_settings() -> None:
    """Model memory = parameters x bytes_per_parameter x parameter_copies, from the profile's settings."""
    table = memory()
    published = table.profiles["published"]
    two_copies = dataclasses.replace(
        published, settings=dataclasses.replace(published.settings, extra={"parameter_copies": 2})
    )
    lines = audit.published_inconsistencies(dataclasses.replace(table, profiles={"published": two_copies}))
    # 2 copies: 90M x 8 bytes = 0.67 GiB, not the printed 1.00; every row leaves its interval
    assert len(lines) == 5
    assert lines[0].startswith("amoebanetd-memory naive-1: published Total Model Parameter Memory 1.00GB, but ")
    assert "90M parameters × 4 bytes × 2 = 0.67 GiB" in lines[0]
