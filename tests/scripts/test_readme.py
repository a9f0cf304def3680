"""scripts/readme.py: every sample output in README.md is what the code prints now (`make readme` rewrites them)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "readme.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_samples", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


readme = _load()


def test_the_readme_opens_with_the_two_set_up_commands() -> None:
    head = readme.README.read_text(encoding="utf-8").splitlines()[:5]
    assert head[:3] == ["# gpipe-bench", "", "```sh"]
    assert head[3].startswith("make demo ") and head[4].startswith("             #")
    assert any(line.startswith("make test ") for line in readme.README.read_text(encoding="utf-8").splitlines()[5:8])


def test_every_sample_is_what_its_command_prints_now() -> None:
    """The marked blocks, run again: a stale one names the command, and `make readme` is the fix."""
    found = readme.samples(readme.README.read_text(encoding="utf-8"))
    assert {s.command.split()[1] for s in found} >= {"list", "table", "predict", "plan"}
    measuring = [s.command for s in found if s.command.split()[1] in ("speed", "memory", "accuracy")]
    assert all("--predict-only" in command for command in measuring), measuring  # nothing measures
    stale = [
        s.command
        for s in found
        if readme.normalise(readme.run(s.command), s.varies) != readme.normalise(s.shown, s.varies)
    ]
    assert not stale, f"README.md samples differ from what the code prints; run `make readme`: {stale}"


def test_output_that_varies_by_machine_is_compared_with_its_figures_masked() -> None:
    here = "#1  22,17,30,47  128  except_last  453.357 samples/sec   4.899x  in 5.0 s\n========  ====="
    there = "#1  22,17,31,46  128  always       452.570 samples/sec   4.891x  in 12.3 s\n=====  ========"
    assert readme.normalise(here, True) == readme.normalise(there, True)
    assert readme.normalise(here, False) != readme.normalise(there, False)  # the rest compares exactly
    assert readme.normalise("naive-1 row", True) != readme.normalise("pipeline-1 row", True)  # words still count


def test_a_marked_block_is_replaced_by_its_command_and_the_rest_kept() -> None:
    text = "intro\n<!-- output: gpipe-bench list -->\n```text\nold\n```\nafter\n"
    (sample,) = readme.samples(text)
    assert (sample.command, sample.varies, sample.shown) == ("gpipe-bench list", False, "old\n")
    new = readme.render(text)
    assert new.startswith("intro\n<!-- output: gpipe-bench list -->\n```text\n$ gpipe-bench list\nTables")
    assert new.endswith("\n```\nafter\n") and "old" not in new


def test_a_sample_that_fails_or_is_not_ours_stops_the_script() -> None:
    with pytest.raises(SystemExit, match="exited 2"):
        readme.run("gpipe-bench table nope")
    with pytest.raises(SystemExit, match="only gpipe-bench commands"):
        readme.run("rm -rf results")
