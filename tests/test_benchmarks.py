"""The engine micro-benchmark under benchmarks/, as far as a CPU can run it (the GPU check: tests/benchmarks/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Dict

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


engine = _load("engine")


def test_engine_quick_run_prints_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert engine.main(["--quick", "--repeats", "1", "--quiet", "--malloc", "default"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "threads:" in out
    assert "median s/step" in out and "spread (min-max)" in out
    for row in ("(a)", "(b)", "(c)", "(d0)", "(d)", "(e)"):
        assert f"\n{row} " in out, f"row {row} missing from:\n{out}"
    assert "(b)/(a) throughput" in out and "(d)/(d0) speedup" in out
    assert "host-bound suite:" in out
    for row in ("(ha)", "(hh)", "(hn)", "(hb)", "(hc)", "(he)", "(hf)"):
        assert f"\n{row} " in out, f"row {row} missing from:\n{out}"
    assert "(hb)/(ha) step time" in out and "(he)/(ha) step time" in out and "except_last's floor" in out


def test_engine_host_suite_alone_restores_the_thread_count(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    assert engine.main(["--quick", "--repeats", "1", "--quiet", "--malloc", "default", "--suite", "host"]) == 0
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads
    assert "(a) " not in out and "workload:" not in out
    assert "1 intra-op thread(s) for every variant" in out


def test_host_bound_workload_is_the_issue_sized_one() -> None:
    workload = engine.HOST_BOUND
    model = engine.host_bound_model(workload)
    assert len(model) == 369
    assert workload.micro == 2 and workload.chunks == 32 and workload.partitions == 8 and workload.threads == 1
    assert engine.even_balance(369, 8) == [47, 46, 46, 46, 46, 46, 46, 46]


def test_engine_chunks_must_divide_batch() -> None:
    with pytest.raises(SystemExit) as exit_info:
        engine.main(["--quick", "--chunks", "3"])
    assert exit_info.value.code == 2


def _timed(key: str, seconds: float, note: str = "") -> Any:
    return engine.Variant(key, "-", "-", 1, "-", None, note, times=[seconds])


def _verdicts(table: str) -> Dict[str, str]:
    """Each ratio row's first words -> its verdict (the last column)."""
    return {line.split()[0]: line.split()[-1] for line in table.splitlines() if line.startswith(("(", "1 + "))}


def test_overlap_verdicts_follow_the_measured_ratios() -> None:
    variants = [_timed("(a)", 1.0), _timed("(b)", 1.02), _timed("(c)", 0.9), _timed("(d0)", 2.0), _timed("(d)", 1.6)]
    verdicts = _verdicts(engine.ratios_table(variants, chunks=8, cores=2))
    assert verdicts["(b)/(a)"] == "PASS"  # 1.0 / 1.02 = 0.98 >= 0.95
    assert verdicts["(b)/(c)"] == "MISS"  # 0.9 / 1.02 = 0.88 < 1.0
    assert verdicts["(d)/(d0)"] == "MISS"  # 1.25 < 1.4


def test_host_bound_verdicts_follow_the_measured_ratios() -> None:
    variants = [
        _timed("(ha)", 1.0),
        _timed("(hh)", 1.02),
        _timed("(hn)", 0.37),
        _timed("(hb)", 1.04),
        _timed("(hc)", 1.10),
        _timed("(he)", 1.40),
        _timed("(hf)", 1.30),
    ]
    table = engine.host_ratios_table(variants, engine.HOST_BOUND)
    verdicts = _verdicts(table)
    assert verdicts["(hb)/(ha)"] == "PASS"  # 1.04 <= 1.05
    assert verdicts["(he)/(ha)"] == "MISS"  # 1.40 > 1.35
    assert verdicts["(hb)/(hc)"] == "PASS"  # 0.945 <= 1.0
    assert verdicts["(he)/(hf)"] == "MISS"  # 1.077 > 1.0
    assert verdicts["(hh)/(ha):"] == "info" and verdicts["1"] == "info"
    assert "1.370" in table  # the floor: 1 + 0.37 / 1.0
    assert "+156 us" in table  # (1.04 - 1.0) s over 32 x 8 cells


def test_a_row_that_did_not_run_is_skipped_with_its_reason() -> None:
    variants = [
        _timed("(ha)", 1.0),
        _timed("(hb)", 1.0),
        engine.Variant("(hc)", "-", "-", 1, "-", None, "not installed"),
    ]
    table = engine.host_ratios_table(variants, engine.HOST_BOUND)
    assert "SKIP (not installed)" in table
