"""The scripts under benchmarks/: the engine micro-benchmark and the GPU check, as far as a CPU can run them."""

from __future__ import annotations

import importlib.util
import subprocess
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
gpu_check = _load("gpu_check")


def test_engine_quick_run_prints_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert engine.main(["--quick", "--repeats", "1", "--quiet", "--malloc", "default"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "threads:" in out
    assert "median s/step" in out and "spread (min-max)" in out
    for row in ("(a)", "(b)", "(c)", "(d0)", "(d)", "(e)"):
        assert f"\n{row} " in out, f"row {row} missing from:\n{out}"
    assert "(b)/(a) throughput" in out and "(d)/(d0) speedup" in out
    assert "PASS" in out or "MISS" in out


def test_engine_chunks_must_divide_batch() -> None:
    with pytest.raises(SystemExit) as exit_info:
        engine.main(["--quick", "--chunks", "3"])
    assert exit_info.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_gpu_check_without_cuda_is_one_line_and_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no CUDA device" in done.stderr


def test_gpu_check_summary_lists_every_step_and_counts() -> None:
    outcomes = [
        gpu_check.Outcome("tests", "pass", 12.0, ["20 passed in 11.9s"]),
        gpu_check.Outcome("syncs", "fail", 3.0, ["host syncs per training step: 2 at 4 micro-batches, 8 at 16"]),
        gpu_check.Outcome("engine", "skip", 0.0, ["not run: the check's time budget is spent"]),
    ]
    text = gpu_check.summary(["card:   X"], outcomes)
    lines = text.splitlines()
    assert lines[0] == "gpu-check" and lines[1] == "card:   X"
    assert any(line.startswith("PASS  tests") for line in lines)
    assert any(line.startswith("FAIL  syncs") for line in lines)
    assert "      host syncs per training step: 2 at 4 micro-batches, 8 at 16" in lines
    assert lines[-1] == "gpu-check: 1 passed, 1 failed, 1 skipped"


def test_gpu_check_step_timeout_fails_the_step_not_the_check(tmp_path: Path) -> None:
    step = gpu_check.Step(
        "sleepy",
        5,
        lambda py, scratch: [py, "-c", "print('FIGURE: started', flush=True); import time; time.sleep(60)"],
        gpu_check._tagged,
    )
    outcome = gpu_check.run_step(step, sys.executable, tmp_path, 2, min_s=1)
    assert outcome.status == "fail"
    assert outcome.figures == ["started", "timed out after 2 s"]


def test_gpu_check_runs_only_what_is_left_of_the_budget(tmp_path: Path) -> None:
    step = gpu_check.Step("late", 5, lambda py, scratch: [py, "-c", "pass"], gpu_check._tagged)
    assert gpu_check.run_step(step, sys.executable, tmp_path, 3).status == "skip"
    assert gpu_check.run_step(step, sys.executable, tmp_path, 30).status == "pass"


def test_gpu_check_finds_the_cuda_tests() -> None:
    files = gpu_check._cuda_test_files()
    assert "tests/pipe/test_cuda.py" in files
