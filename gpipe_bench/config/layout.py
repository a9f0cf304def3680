"""The shape of a table file: which keys each level may hold, how each value is checked, its default.

These schemas are the list of allowed keys (the YAML files explain each one);
the loader walks them with :func:`~gpipe_bench.config.schema.check_fields`,
and :func:`~gpipe_bench.config.rows.apply` checks command-line overrides with
the same checkers, so an option and a config line are refused in the same words.
The rules that tie several values together live in :mod:`gpipe_bench.config.rules`;
``settings.extra`` per table kind in :mod:`gpipe_bench.config.kinds`.
"""

from __future__ import annotations

from typing import Any, Dict

from gpipe_bench.precision import DEFAULT as DEFAULT_PRECISION
from gpipe_bench.precision import PRECISIONS

from .schema import (
    ABSENT,
    MISSING,
    Checker,
    Schema,
    Source,
    check_fields,
    choice,
    flag,
    fraction,
    integer,
    join,
    mapping,
    text,
)
from .types import CHECKPOINTS, KINDS, MODES

__all__ = [
    "COMPARE",
    "PLANNED",
    "PREDICTED",
    "REQUIRED_PROFILES",
    "ROW",
    "ROW_OVERRIDES",
    "SETTINGS",
    "SOURCE",
    "TABLE",
    "balance",
    "model_args",
    "optimizer",
]

#: ``balance: planned`` in a row.
PLANNED = "planned"
#: Profiles every table has: the table as printed, and sizes for a small CPU machine.
REQUIRED_PROFILES = ("published", "quick")


def model_args(src: Source, key: str, value: Any) -> Dict[str, Any]:
    """Keyword arguments of the model; the class count is a setting, never one of them."""
    args = mapping(src, key, value)
    if "num_classes" in args:
        src.fail(
            join(key, "num_classes"),
            args["num_classes"],
            "the class count is a setting",
            "remove it and set settings.classes",
        )
    return args


def optimizer(src: Source, key: str, value: Any) -> Dict[str, Any]:
    """``settings.optimizer``: a mapping with at least a ``name`` (optim.build reads the rest)."""
    given = mapping(src, key, value)
    if not isinstance(given.get("name"), str):
        src.fail(join(key, "name"), given.get("name", MISSING), "the optimizer needs a name", "write e.g. name: sgd")
    return given


def balance(src: Source, key: str, value: Any) -> Any:
    """A list of layer counts, null, or ``planned`` (the planner chooses it for the devices at hand)."""
    if value is None or value == PLANNED:
        return value
    if not isinstance(value, (list, tuple)) or not value:
        src.fail(
            key,
            value,
            "not a list of layer counts",
            f"write e.g. [140, 230] (one entry per partition), or {PLANNED} to plan it when the row runs",
        )
    return tuple(integer(1)(src, f"{key}[{i}]", v) for i, v in enumerate(value))


def _nested(schema: Schema) -> Checker:
    """A checker of a mapping whose keys ``schema`` lists (a sub-level of the file)."""

    def check(src: Source, key: str, value: Any) -> Dict[str, Any]:
        return check_fields(src, key, value, schema)

    return check


SOURCE: Schema = {
    "hardware": (text, MISSING),
    "software": (text, MISSING),
    "reference": (text, MISSING),
    "notes": (text, ""),
}
SETTINGS: Schema = {
    "input_size": (integer(1), MISSING),
    "dataset_size": (integer(1), MISSING),
    "epochs": (integer(1), MISSING),
    "skip_epochs": (integer(0), MISSING),
    "optimizer": (optimizer, MISSING),
    "classes": (integer(1), MISSING),
    "extra": (mapping, {}),
}
#: What a profile other than ``published`` may change per row (rows keep their names, modes, devices, checkpoints).
ROW_OVERRIDES: Schema = {
    "batch": (integer(1), ABSENT),
    "chunks": (integer(1), ABSENT),
    "balance": (balance, ABSENT),
    "model_args": (model_args, {}),
    "note": (text, ABSENT),
    "precision": (choice(*PRECISIONS), ABSENT),
}
ROW: Schema = {
    "name": (text, MISSING),
    "mode": (choice(*MODES), MISSING),
    "devices": (integer(1), MISSING),
    "batch": (integer(1), MISSING),
    "chunks": (integer(1), 1),
    "balance": (balance, None),
    "checkpoint": (choice(*CHECKPOINTS), ABSENT),
    "model_args": (model_args, {}),
    "published": (mapping, MISSING),
    "note": (text, ""),
    "precision": (choice(*PRECISIONS), DEFAULT_PRECISION),
}
# compare.predicted: the published rows predicted on a hardware preset beside the published speedups
# (gpipe-bench predict); check: whether compare --check fails when a prediction leaves the tolerance.
PREDICTED: Schema = {
    "hardware": (text, MISSING),
    "calibrate": (text, ""),
    "check": (flag, False),
}
COMPARE: Schema = {
    "tolerance": (fraction, MISSING),
    "predicted": (_nested(PREDICTED), {}),
}
TABLE: Schema = {
    "name": (text, MISSING),
    "title": (text, MISSING),
    "kind": (choice(*KINDS), MISSING),
    "metric": (text, MISSING),
    "unit": (text, MISSING),
    "higher_is_better": (flag, MISSING),
    "baseline": (text, MISSING),
    "model": (text, MISSING),
    "model_args": (model_args, {}),
    "source": (_nested(SOURCE), MISSING),
    "compare": (_nested(COMPARE), MISSING),
    "settings": (_nested(SETTINGS), MISSING),
    "rows": (lambda s, k, v: v, MISSING),  # checked row by row by the loader, which names each row
    "profiles": (mapping, MISSING),
}
