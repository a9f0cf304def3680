"""Who imports whom in gpipe_bench: the layers docs/architecture.md lists, checked on the code.

Imports inside functions count (tests/helpers.py: module_imports): a lazy import
that reaches across the layers ties them together as surely as one at the top.
The layer list is read from the document itself, so the two cannot drift.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import gpipe_bench
from helpers import module_imports

PACKAGE = Path(gpipe_bench.__file__).resolve().parent
DOC = PACKAGE.parent / "docs" / "architecture.md"


def _modules() -> Dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["gpipe_bench", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _edges(name: str) -> List[Tuple[int, str]]:
    """(line, module of gpipe_bench) for each import in ``name``; ``from pkg import mod`` counts as ``pkg.mod``."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for line, target, names in module_imports(path.read_text(), package, with_names=True):
        if not target.startswith("gpipe_bench"):
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        for module in subs or [target]:
            if module in MODULES and module != name:
                out.append((line, module))
    return out


def _unit(module: str) -> str:
    """The layer unit of a module: its top-level module or subpackage under gpipe_bench."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gpipe_bench"


def documented_layers() -> List[List[str]]:
    """The layers of docs/architecture.md's "Import layers" block, lowest first."""
    text = DOC.read_text()
    block = re.search(r"## Import layers.*?```text\n(.*?)```", text, re.S)
    assert block is not None, "docs/architecture.md has no '## Import layers' text block"
    layers = []
    for line in block.group(1).splitlines():
        match = re.match(r"\s*\d+\.\s+(.*?)(?:\s{2,}.*)?$", line)
        if match:
            layers.append(match.group(1).replace(",", " ").split())
    return layers


def test_the_documented_layers_name_every_module_once() -> None:
    named = [unit for layer in documented_layers() for unit in layer]
    assert len(named) == len(set(named)), "a unit is listed twice"
    assert set(named) == {_unit(m) for m in MODULES}


def test_no_module_imports_a_higher_layer() -> None:
    level = {unit: j for j, layer in enumerate(documented_layers()) for unit in layer}
    upward = [
        f"{MODULES[name].relative_to(PACKAGE)}:{line}: {target}"
        for name in MODULES
        for line, target in _edges(name)
        if level[_unit(target)] > level[_unit(name)]
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    graph: Dict[str, Set[str]] = {name: {t for _, t in _edges(name)} for name in MODULES}
    # Tarjan's strongly connected components, iterative: any component of two or more modules is a cycle.
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    assert cycles == []


def test_the_measurement_loops_see_the_trainer_interface_only() -> None:
    """measure/ drives engines.Trainer; which engine runs a row is engines.build's business."""
    reached = [
        f"{MODULES[name].relative_to(PACKAGE)}:{line}: {target}"
        for name in MODULES
        if _unit(name) == "measure"
        for line, target in _edges(name)
        if target.startswith("gpipe_bench.engines.") and target != "gpipe_bench.engines.base"
    ]
    assert reached == []


def test_predict_does_not_import_report() -> None:
    """A prediction is data; rendering it is report's job (report may import predict, not the reverse)."""
    assert not [t for name in MODULES if _unit(name) == "predict" for _, t in _edges(name) if _unit(t) == "report"]


def test_the_walk_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """The walk sees imports inside functions and ``from package import module`` as the module."""
    source = "def f():\n    from gpipe_bench.predict import plan\n"
    [(line, target, names)] = list(module_imports(source, ["gpipe_bench", "jobs"], with_names=True))
    assert (line, target, names) == (2, "gpipe_bench.predict", ["plan"])
