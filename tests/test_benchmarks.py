"""The engine micro-benchmark under benchmarks/, as far as a CPU can run it (the GPU check: tests/benchmarks/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

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
    assert "PASS" in out or "MISS" in out
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
