"""Choosing the row a command names and overriding it from the command line, validated as at load time.

Why here: ``--pipeline N``, ``--naive N`` and ``--experiment NAME`` name rows
of a loaded table, and ``--batch-size`` and the like change them; both can
go wrong in ways only the table knows (the rows it has, a balance's length),
so both answer with the same one-line :class:`~gpipe_bench.config.schema.ConfigError`
as a mistake in the file: a value a flag gave is named by its flag (``--chunks 16: ...``),
one the file gave by its key, tagged " (after overrides)".
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Optional, Tuple

from .layout import ROW, SETTINGS
from .rules import check_row, check_settings
from .schema import MISSING, Source
from .types import FLAGS, Overrides, Row, Settings, Table

__all__ = ["NAMED", "apply", "find_row", "overridden"]


def find_row(
    table: Table,
    *,
    pipeline: Optional[int] = None,
    naive: Optional[int] = None,
    experiment: Optional[str] = None,
    profile: str = "published",
) -> Row:
    """The row asked for by ``--pipeline N``, ``--naive N`` or ``--experiment NAME`` (exactly one)."""
    src = Source(table.path)
    asked = [
        (flag, v)
        for flag, v in (("--pipeline", pipeline), ("--naive", naive), ("--experiment", experiment))
        if v is not None
    ]
    if len(asked) != 1:
        src.fail(
            "row",
            ", ".join(f"{f} {v}" for f, v in asked) or MISSING,
            "name exactly one row",
            "give one of --pipeline N, --naive N or --experiment NAME",
        )
    if experiment is not None:
        return table.row(experiment, profile)
    flag, devices = asked[0]
    mode = flag.lstrip("-")
    rows = table.profile(profile).rows
    found = [r for r in rows if r.mode == mode and r.devices == devices]
    if len(found) > 1:  # the published row, not one planned beside it (--experiment NAME names that)
        found = [r for r in found if not r.planned] or found
    if len(found) != 1:
        options = [
            f"--{m} " + "/".join(str(d) for d in sorted({r.devices for r in rows if r.mode == m}))
            for m in ("naive", "pipeline")
            if any(r.mode == m for r in rows)
        ]
        problem = (
            f"several {mode} rows over {devices} devices ({', '.join(r.name for r in found)})"
            if found
            else f"{table.name} has no {mode} row over {devices} device(s)"
        )
        src.fail(
            flag,
            devices,
            problem,
            f"use one of {', '.join(options + ['--experiment NAME'])} (rows: {', '.join(r.name for r in rows)})",
        )
    return found[0]


def apply(table: Table, row: Row, settings: Settings, overrides: Overrides, model: str = "") -> Tuple[Row, Settings]:
    """``row`` and ``settings`` with the overrides given; validated as at load time (ConfigError).

    ``model``: the row's profile's model (:attr:`Profile.model`), where a profile trains a smaller one.
    """
    key = f"rows.{row.name}"
    keys = {f: f"{key}.{f}" if f in ROW else f"settings.{f}" for f in FLAGS}
    flags = {keys[f]: overrides.flag(f) for f in FLAGS if overrides.flag(f)}
    given = overrides.given()
    src = Source(table.path, " (after overrides)", flags, frozenset(keys[f] for f in given if keys[f] in flags))
    model = model or table.model
    row = replace(row, **{f: ROW[f][0](src, f"{key}.{f}", v) for f, v in given.items() if f in ROW})
    if "balance" in given:  # a balance given replaces a planned one
        row = replace(row, planned=False)
    settings = replace(
        settings, **{f: SETTINGS[f][0](src, f"settings.{f}", v) for f, v in given.items() if f in SETTINGS}
    )
    check_settings(src, "settings", settings)
    check_row(src, key, {"model": model, "kind": table.kind}, row, settings)
    return row, settings


#: The row's settings a record's name stands for (what a run may change and still run the row's model).
#: Precision and engine are not here: a record's name has a suffix of its own for each
#: (:func:`gpipe_bench.results.path_for`). An accuracy table's epochs are (how long a row trains is
#: what its error is); a speed or memory figure does not depend on them (per epoch; two steps).
NAMED = ("batch", "chunks", "balance", "checkpoint")


def overridden(kind: str, config: Tuple[Row, Settings], run: Tuple[Row, Settings]) -> Dict[str, Any]:
    """What ``run`` (a row and settings after :func:`apply`) changed of the ``config``'s row: name -> value as run.

    Empty for a run that only restates the row's own settings. A balance the
    config leaves to the planner or to ``balance_by_size`` is the row's own
    until a balance is given instead. Values are JSON's (a balance is a list).
    """
    (row, settings), (ran, ran_settings) = config, run
    changed: Dict[str, Any] = {}
    for name in NAMED:
        before, after = getattr(row, name), getattr(ran, name)
        if before != after:
            changed[name] = list(after) if isinstance(after, tuple) else after
    if kind == "accuracy" and settings.epochs != ran_settings.epochs:
        changed["epochs"] = ran_settings.epochs
    return changed
