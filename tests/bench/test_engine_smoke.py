"""Smoke test of the engine benchmark: ``--quick --repeats 1`` runs and prints both tables."""
from __future__ import annotations

import importlib

import pytest

try:
    importlib.import_module("gpipe_bench.pipe")
except Exception as error:  # noqa: BLE001 - any import failure means the engine is not there yet
    pytest.skip(f"gpipe_bench.pipe cannot be imported yet ({type(error).__name__}: {error})", allow_module_level=True)

from gpipe_bench.bench import engine  # noqa: E402 - after the skip guard


def test_quick_run_prints_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert engine.main(["--quick", "--repeats", "1", "--quiet", "--malloc", "default"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "threads:" in out
    assert "median s/step" in out and "spread (min-max)" in out
    for row in ("(a)", "(b)", "(c)", "(d0)", "(d)", "(e)"):
        assert f"\n{row} " in out, f"row {row} missing from:\n{out}"
    assert "(b)/(a) throughput" in out and "(d)/(d0) speedup" in out
    assert "PASS" in out or "MISS" in out


def test_chunks_must_divide_batch() -> None:
    with pytest.raises(SystemExit) as exit_info:
        engine.main(["--quick", "--chunks", "3"])
    assert exit_info.value.code == 2
