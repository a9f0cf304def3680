"""README.md's sample outputs, regenerated from the code as it is (`make readme`) and checked by the tests.

Why: outputs pasted into a README by hand go stale the day a row, a column or a
listing changes, and a newcomer's first hour is spent on the difference. Each
sample is a ``text`` block right after a marker naming the command that prints it::

    <!-- output: gpipe-bench list -->
    <!-- output varies: gpipe-bench predict resnet101 --hardware p40 -->

``make readme`` runs every marked command and writes what it prints (stdout, after
a ``$ command`` line) into the block; ``tests/scripts/test_readme.py`` runs them
again and fails on a block that differs. ``varies`` marks output that depends on
the machine running it (a prediction measures the host's time per operator there,
and its ranking of close plans can follow): those are compared with every number
and checkpoint mode masked. No marked command measures a table (``memory --predict-only``
runs nothing): measured rows are
shown as ``gpipe-bench table`` over the committed ``results/``, so the samples
never take minutes, and the commands run in this process with
``GPIPE_BENCH_RESULTS`` set to that directory.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, List, Tuple

from click.testing import CliRunner

from gpipe_bench.atomic import write_atomically
from gpipe_bench.cli import main

__all__ = ["README", "RESULTS", "Sample", "normalise", "render", "run", "samples"]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "results"

_MARKED = re.compile(r"^<!-- output( varies)?: (.+?) -->\n```text\n(.*?)^```$", re.M | re.S)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_MODE = re.compile(r"\b(?:always|except_last|never)\b")
_TITLE = re.compile(r" on \S+ (\(\w+ profile(?:, \w+)?\)): .*$")


@dataclass(frozen=True)
class Sample:
    """One marked block: the command, whether its output varies by machine, and the block as written."""

    command: str
    varies: bool
    shown: str
    span: Tuple[int, int]  # the block's text within the README


def samples(text: str) -> List[Sample]:
    """Every marked block of ``text``, in order."""
    return [Sample(m.group(2), bool(m.group(1)), m.group(3), m.span(3)) for m in _MARKED.finditer(text)]


def run(command: str) -> str:
    """What ``command`` (``gpipe-bench ...``) prints on stdout, after a ``$ command`` line: the block's text.

    A command that fails is an error here: a sample must be what works.
    """
    program, *args = shlex.split(command)
    if program != "gpipe-bench":
        raise SystemExit(f"README sample {command!r}: only gpipe-bench commands are run")
    result = CliRunner().invoke(main, args, env={"GPIPE_BENCH_RESULTS": str(RESULTS)})
    if result.exit_code != 0:
        raise SystemExit(f"README sample {command!r} exited {result.exit_code}: {result.output.strip()[-500:]}")
    return f"$ {command}\n{result.stdout.rstrip()}\n"


def normalise(block: str, varies: bool) -> str:
    """``block`` as compared: as it is, or (``varies``) with numbers and checkpoint modes masked,
    a table's machine title (``... on <host> (<profile> profile): <hardware>; <torch>; <date>``)
    reduced to its profile, and table rules and spaces collapsed, so a figure measured on
    another machine is no difference."""
    if not varies:
        return block
    lines = []
    for line in block.splitlines():
        line = _TITLE.sub(r"\1", line)
        line = _MODE.sub("MODE", _NUMBER.sub("0", line))
        lines.append(" ".join(re.sub(r"=+", "=", line).split()))
    return "\n".join(lines)


def render(text: str) -> str:
    """``text`` with every marked block replaced by what its command prints now."""
    out, at = [], 0
    for sample in samples(text):
        start, end = sample.span
        out += [text[at:start], run(sample.command)]
        at = end
    return "".join(out) + text[at:]


def main_() -> None:
    """`make readme`: rewrite README.md's samples (atomically); with --check, only say which are stale (exit 1)."""
    text = README.read_text(encoding="utf-8")
    if sys.argv[1:] == ["--check"]:
        stale = [
            s.command for s in samples(text) if normalise(run(s.command), s.varies) != normalise(s.shown, s.varies)
        ]
        for command in stale:
            print(f"stale: {command}", file=sys.stderr)
        sys.exit(1 if stale else 0)
    new = render(text)

    def write(f: BinaryIO) -> None:
        f.write(new.encode("utf-8"))

    write_atomically(README, write)
    print(f"README.md: {len(samples(text))} samples regenerated" + ("" if new != text else " (none changed)"))


if __name__ == "__main__":
    main_()
