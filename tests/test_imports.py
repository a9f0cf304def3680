"""Who imports whom in gpipe_bench: the layer rules docs/architecture.md states, checked on the code.

Imports inside functions count (tests/helpers.py: module_imports).
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import gpipe_bench
from helpers import module_imports

PACKAGE = Path(gpipe_bench.__file__).resolve().parent


def _crossings(layer: str, forbidden: str) -> List[str]:
    found = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        package = ["gpipe_bench", *path.relative_to(PACKAGE).parent.parts]
        for line, name in module_imports(path.read_text(), package):
            if name == f"gpipe_bench.{forbidden}" or name.startswith(f"gpipe_bench.{forbidden}."):
                found.append(f"{path.relative_to(PACKAGE)}:{line}: {name}")
    return found


def test_predict_does_not_import_report() -> None:
    """A prediction is data; rendering it is report's job (report may import predict, not the reverse)."""
    assert _crossings("predict", "report") == []
