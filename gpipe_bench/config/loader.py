"""Reading a table: ``gpipe_bench/configs/*.yaml`` (package data) -> a validated :class:`~gpipe_bench.config.types.Table`.

Why validated whole here: a config is checked completely when it is loaded
(every profile, every row, ``settings.extra`` by its kind), so no run starts
from a bad setting and a mistake surfaces before any work, as one
:class:`~gpipe_bench.config.schema.ConfigError` line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import yaml  # type: ignore[import-untyped, unused-ignore]

from gpipe_bench import models

from .kinds import check_extra
from .layout import PLANNED, REQUIRED_PROFILES, ROW, ROW_OVERRIDES, SETTINGS, TABLE, model_args
from .rules import check_row, check_settings
from .schema import ABSENT, MISSING, Checker, ConfigError, Source, check_fields, mapping, text
from .types import Profile, Published, Row, Settings, Table

__all__ = ["config_dir", "load", "table_names"]


#: A safe loader that refuses duplicate keys (with the plain one the later key silently wins).
_Loader: Any = type("_Loader", (yaml.SafeLoader,), {})


def _no_duplicates(loader: Any, node: Any) -> Dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return dict(loader.construct_mapping(node))


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def config_dir() -> Path:
    """Where the table configs live: $GPIPE_BENCH_CONFIGS, else the ones shipped in the package (gpipe_bench/configs)."""
    env = os.environ.get("GPIPE_BENCH_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


def table_names() -> List[str]:
    """Names of the tables in :func:`config_dir`, sorted."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def _read(path: Path) -> Any:
    src = Source(str(path))
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except OSError as exc:
        src.fail("(file)", str(path), f"cannot be read ({exc.strerror})", "give a readable YAML file")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f"line {mark.line + 1}" if mark is not None else "unknown line"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{src.short}: {line}: malformed YAML ({problem}); "
            f"fix the syntax at {line} (indentation, `key: value`, closing brackets)"
        ) from None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated by ``over``, mappings merged key by key (lists are replaced)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(name_or_path: str) -> Table:
    """The table named ``name_or_path`` in :func:`config_dir`, or the YAML file at that path; validated whole."""
    looks_like_path = os.sep in name_or_path or "/" in name_or_path or name_or_path.endswith((".yaml", ".yml"))
    path = Path(name_or_path) if looks_like_path else config_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        Source(str(config_dir() if not looks_like_path else path)).fail(
            "table", name_or_path, "no such config", f"use one of: {', '.join(table_names())}, or a path to a YAML file"
        )
    path = path.resolve()
    src = Source(str(path))
    top = check_fields(src, "", _read(path), TABLE)
    if top["name"] != path.stem:
        src.fail(
            "name",
            top["name"],
            f"differs from the file name {path.name!r}",
            f"write name: {path.stem} (or rename the file)",
        )
    if top["model"] not in models.names():
        src.fail("model", top["model"], "unknown model", f"use one of: {', '.join(models.names())}")
    rows = _rows(src, top["rows"])
    if top["baseline"] not in rows:
        src.fail("baseline", top["baseline"], "no such row", f"use one of: {', '.join(rows)}")
    raw_profiles = top["profiles"]
    for required in REQUIRED_PROFILES:
        if required not in raw_profiles:
            src.fail(
                f"profiles.{required}",
                MISSING,
                "every table needs this profile",
                f"add `{required}:` with a description under profiles",
            )
    order = ["published"] + [name for name in raw_profiles if name != "published"]  # table rows are checked first
    profiles = {name: _profile(src, top, rows, name, raw_profiles[name]) for name in order}
    return Table(
        name=top["name"],
        title=top["title"],
        kind=top["kind"],
        metric=top["metric"],
        unit=top["unit"],
        higher_is_better=top["higher_is_better"],
        baseline=top["baseline"],
        model=top["model"],
        model_args=top["model_args"],
        source=top["source"],
        tolerance=top["compare"]["tolerance"],
        path=str(path),
        profiles=profiles,
        predicted=top["compare"]["predicted"],
    )


def _rows(src: Source, raw: Any) -> Dict[str, Dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        src.fail("rows", raw, "not a list of rows", "write one `- name: ...` entry per published row")
    rows: Dict[str, Dict[str, Any]] = {}
    for i, entry in enumerate(raw):
        label = (
            f"rows.{entry['name']}" if isinstance(entry, dict) and isinstance(entry.get("name"), str) else f"rows[{i}]"
        )
        row = check_fields(src, label, entry, ROW)
        if row["name"] in rows:
            src.fail(f"{label}.name", row["name"], "a second row of that name", "give every row its own name")
        rows[row["name"]] = row
    return rows


def _profile(src: Source, top: Mapping[str, Any], rows: Mapping[str, Dict[str, Any]], name: str, raw: Any) -> Profile:
    """The profile ``name``: the table's settings, model and rows merged with what the profile changes.

    A profile other than ``published`` may override settings, the model (a
    smaller one of the same family), model args and, per row, batch, chunks,
    balance, model_args and note. Model args merge table -> row -> profile ->
    profile row.
    """
    key = f"profiles.{name}"
    schema: Dict[str, Tuple[Checker, Any]] = {"description": (text, MISSING)}
    if name != "published":  # the published profile is the table itself
        schema.update(settings=(mapping, {}), model_args=(model_args, {}), rows=(mapping, {}), model=(text, ABSENT))
    given = check_fields(src, key, raw, schema)
    model = given.get("model", top["model"])
    if model not in models.names():
        src.fail(f"{key}.model", model, "unknown model", f"use one of: {', '.join(models.names())}")
    top = {**top, "model": model}
    settings = Settings(
        **check_fields(src, f"{key}.settings", _merge(top["settings"], given.get("settings", {})), SETTINGS)
    )
    check_settings(src, f"{key}.settings" if given.get("settings") else "settings", settings)
    check_extra(
        src,
        f"{key}.settings.extra" if given.get("settings", {}).get("extra") else "settings.extra",
        top["kind"],
        settings.extra,
    )
    profile_args = _merge(top["model_args"], given.get("model_args", {}))
    overrides = given.get("rows", {})
    for row_name in overrides:
        if row_name not in rows:
            src.fail(f"{key}.rows.{row_name}", overrides[row_name], "no such row", f"use one of: {', '.join(rows)}")
    built = []
    for row_name, base in rows.items():
        over = check_fields(src, f"{key}.rows.{row_name}", overrides.get(row_name, {}), ROW_OVERRIDES)
        merged = {**base, **over}
        merged["model_args"] = _merge(
            _merge(_merge(top["model_args"], base["model_args"]), given.get("model_args", {})), over["model_args"]
        )
        merged.setdefault("checkpoint", "except_last" if base["mode"] == "pipeline" else "never")
        merged["published"] = Published(base["published"])
        if merged.get("balance") == PLANNED:
            merged["balance"], merged["planned"] = None, True
        row = Row(**merged)
        check_row(src, f"{key}.rows.{row_name}" if name != "published" else f"rows.{row_name}", top, row, settings)
        built.append(row)
    return Profile(
        name=name,
        description=given["description"],
        settings=settings,
        rows=tuple(built),
        model_args=profile_args,
        model=model,
    )
