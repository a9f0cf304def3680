"""gpipe_bench.pipe stands alone: it imports torch and itself, nothing of the harness around it.

Like torchgpipe's package, the engine must be usable (and readable) without the
benchmark harness; a rule both need lives in ``pipe/`` and the harness imports it
from there. Imports inside functions count: a lazy import that reaches up ties
the layers together as surely as one at the top.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import gpipe_bench.pipe
from helpers import module_imports

PIPE = Path(gpipe_bench.pipe.__file__).resolve().parent


def _package(path: Path) -> List[str]:
    return ["gpipe_bench", *path.relative_to(PIPE.parent).parent.parts]


def test_pipe_imports_nothing_of_gpipe_bench_outside_pipe() -> None:
    outside = [
        f"{path.relative_to(PIPE.parent)}:{line}: {name}"
        for path in sorted(PIPE.rglob("*.py"))
        for line, name in module_imports(path.read_text(), _package(path))
        if name.split(".")[0] == "gpipe_bench"
        and not (name == "gpipe_bench.pipe" or name.startswith("gpipe_bench.pipe."))
    ]
    assert outside == []


def test_the_walk_sees_relative_and_function_levelmodule_imports() -> None:
    source = "import torch\n\ndef f():\n    from .. import perf\n    from ..skip.tracker import SkipKey\n"
    names = [name for _, name in module_imports(source, ["gpipe_bench", "pipe", "skip"])]
    assert names == ["torch", "gpipe_bench.pipe", "gpipe_bench.pipe.skip.tracker"]
    names = [
        name for _, name in module_imports("def f():\n    from ...perf import split\n", ["gpipe_bench", "pipe", "x"])
    ]
    assert names == ["gpipe_bench.perf"]


def test_the_harness_uses_the_engines_own_rules() -> None:
    """perf.py re-exports the engine's rules: one home each, not a copy that could drift."""
    from gpipe_bench import perf
    from gpipe_bench.pipe import checkpoint, microbatch, partitions

    assert perf.micro_batch_sizes is microbatch.micro_batch_sizes
    assert perf.checkpoint_stop is checkpoint.checkpoint_stop
    assert perf.CHECKPOINT_MODES is checkpoint.CHECKPOINT_MODES
    assert perf.layer_ranges is partitions.layer_ranges and perf.split is partitions.split
