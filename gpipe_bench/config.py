"""Experiment configs: ``gpipe_bench/configs/*.yaml`` (package data) -> frozen, validated dataclasses.

Why: every number of a published row lives in a YAML file (data) and reaches
the harness through here only (code). A config is checked whole at load time,
and again after command-line overrides, so no run starts from a bad setting;
every mistake a user can make is one :class:`ConfigError` line naming the file,
the key, the bad value and the fix (exit code 2). The schemas below (``_TABLE``,
``_ROW``, ...) are the list of allowed keys; the YAML files explain each one.

Profiles: ``published`` is the table as printed; ``quick`` (or any other) may
override settings, the model (a smaller one of the same family), model args
and, per row, batch, chunks, balance, model_args and note; rows keep their names, modes, devices and checkpoint modes. Model
args merge table -> row -> profile -> profile row into :attr:`Row.model_args`;
the class count is ``settings.classes``, never a model arg. Only a memory table
may leave a multi-device row's balance null (found by ``balance_by_size``).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Mapping, NoReturn, Optional, Tuple, get_args

import yaml  # type: ignore[import-untyped, unused-ignore]

from gpipe_bench import models
from gpipe_bench.errors import HarnessError

__all__ = [
    "PLANNED",
    "ConfigError",
    "Published",
    "Row",
    "Settings",
    "Profile",
    "Table",
    "Overrides",
    "table_names",
    "config_dir",
    "load",
    "find_row",
    "apply",
    "KINDS",
    "MODES",
    "CHECKPOINTS",
]

#: What a table measures.
Kind = Literal["speed", "memory", "accuracy"]
#: How a row runs: the plain model (or split without micro-batches), GPipe, or data-parallel replicas.
Mode = Literal["naive", "pipeline", "dataparallel"]
#: GPipe's checkpoint modes (perf.CHECKPOINT_MODES).
Checkpoint = Literal["always", "except_last", "never"]
KINDS: Tuple[Kind, ...] = get_args(Kind)
MODES: Tuple[Mode, ...] = get_args(Mode)
CHECKPOINTS: Tuple[Checkpoint, ...] = get_args(Checkpoint)
_REQUIRED_PROFILES = ("published", "quick")


class ConfigError(HarnessError):
    """A mistake the user can fix in a config or an option: one line naming file, key, value and the fix. Exit 2."""


@dataclass(frozen=True)
class Published:
    """What the source table printed for a row, keyed by column (units in the key or the table's ``unit``)."""

    values: Mapping[str, Any]


@dataclass(frozen=True)
class Row:
    """One experiment of a table, as run in one profile."""

    name: str
    mode: Mode
    devices: int
    batch: int
    chunks: int
    balance: Optional[Tuple[int, ...]]
    checkpoint: Checkpoint
    model_args: Mapping[str, Any]  # merged: table -> row -> profile -> profile row
    published: Published
    note: str
    #: ``balance: planned``: the balance is chosen for the devices at hand when the row runs
    #: (:func:`gpipe_bench.predict.plan.planned_balance`); ``balance`` holds it once resolved
    planned: bool = False


@dataclass(frozen=True)
class Settings:
    """Settings common to every row of a table, as merged for one profile."""

    input_size: int
    dataset_size: int
    epochs: int
    skip_epochs: int
    optimizer: Mapping[str, Any]
    classes: int
    extra: Mapping[str, Any]


@dataclass(frozen=True)
class Profile:
    """A way to run the table: "published" sizes, or "quick" ones for a small CPU machine."""

    name: str
    description: str
    settings: Settings
    rows: Tuple[Row, ...]
    model_args: Mapping[str, Any]
    model: str = ""  # the registered model this profile trains (the table's unless the profile names a smaller one)


@dataclass(frozen=True)
class Table:
    """A published table: what it measures, where it came from, and its rows per profile."""

    name: str
    title: str
    kind: Kind
    metric: str
    unit: str
    higher_is_better: bool
    baseline: str
    model: str
    model_args: Mapping[str, Any]
    source: Mapping[str, str]
    tolerance: float
    path: str
    profiles: Mapping[str, Profile]
    predicted: Mapping[str, Any] = field(default_factory=dict)  # compare.predicted: hardware, calibrate, check

    def profile(self, name: str) -> Profile:
        """The profile ``name``; ConfigError naming the known profiles otherwise."""
        if name not in self.profiles:
            _Src(self.path).fail("profiles", name, "no such profile", f"use one of: {', '.join(self.profiles)}")
        return self.profiles[name]

    def row(self, name: str, profile: str = "published") -> Row:
        """The row ``name`` in ``profile``; ConfigError naming the known rows otherwise."""
        rows = self.profile(profile).rows
        found = next((row for row in rows if row.name == name), None)
        if found is None:
            _Src(self.path).fail(
                "rows", name, f"no such row in {self.name}", f"use one of: {', '.join(r.name for r in rows)}"
            )
        return found


@dataclass(frozen=True)
class Overrides:
    """Command-line overrides of a row and its settings; None keeps the config's value."""

    batch: Optional[int] = None
    chunks: Optional[int] = None
    balance: Optional[Tuple[int, ...]] = None
    checkpoint: Optional[str] = None
    epochs: Optional[int] = None
    skip_epochs: Optional[int] = None


# -- the schema-checking helper ---------------------------------------------------------------------

_MISSING: Any = object()  # a required key: no default
_ABSENT: Any = object()  # an optional key with no default: left out when not given
Checker = Callable[["_Src", str, Any], Any]


def _show(value: Any) -> str:
    """A value as YAML would spell it, on one line, cut at 80 characters."""
    if value is _MISSING:
        return "(missing)"
    if value is None or isinstance(value, bool):
        text = "null" if value is None else str(value).lower()
    else:
        text = repr(value) if isinstance(value, str) else str(list(value) if isinstance(value, tuple) else value)
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class _Src:
    """Where values come from: the file, and a tag such as " (after overrides)"."""

    path: str
    tag: str = ""

    def fail(self, key: str, value: Any, problem: str, fix: str) -> NoReturn:
        raise ConfigError(f"{self.short}: {key} = {_show(value)}{self.tag}: {problem}; {fix}")

    @property
    def short(self) -> str:  # the path relative to the working directory when below it
        rel = os.path.relpath(self.path)
        return self.path if rel.startswith("..") else rel


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _int(minimum: int = 1) -> Checker:
    def check(src: _Src, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            src.fail(key, value, "not a whole number", f"write an integer >= {minimum}")
        if value < minimum:
            src.fail(key, value, f"must be at least {minimum}", f"write an integer >= {minimum}")
        return value

    return check


def _choice(*options: str) -> Checker:
    def check(src: _Src, key: str, value: Any) -> str:
        if value not in options:
            src.fail(key, value, "unknown value", f"use one of: {', '.join(options)}")
        return str(value)

    return check


def _typed(kind: type, problem: str, fix: str) -> Checker:
    def check(src: _Src, key: str, value: Any) -> Any:
        if not isinstance(value, kind):
            src.fail(key, value, problem, fix)
        return value

    return check


_text = _typed(str, "not a string", "write text (quote it if YAML reads it as something else)")
_flag = _typed(bool, "not a boolean", "write true or false")


def _fraction(src: _Src, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        src.fail(key, value, "not a number between 0 and 1", "write a relative tolerance such as 0.10")
    return float(value)


def _mapping(src: _Src, key: str, value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        src.fail(key, value, "not a mapping", "write `name: value` entries (or {} for none)")
    return dict(value)


def _model_args(src: _Src, key: str, value: Any) -> Dict[str, Any]:
    args = _mapping(src, key, value)
    if "num_classes" in args:
        src.fail(
            _join(key, "num_classes"),
            args["num_classes"],
            "the class count is a setting",
            "remove it and set settings.classes",
        )
    return args


def _optimizer(src: _Src, key: str, value: Any) -> Dict[str, Any]:
    optimizer = _mapping(src, key, value)
    if not isinstance(optimizer.get("name"), str):
        src.fail(
            _join(key, "name"), optimizer.get("name", _MISSING), "the optimizer needs a name", "write e.g. name: sgd"
        )
    return optimizer


def _balance(src: _Src, key: str, value: Any) -> Any:
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
    return tuple(_int(1)(src, f"{key}[{i}]", v) for i, v in enumerate(value))


def _fields(src: _Src, key: str, raw: Any, schema: Mapping[str, Tuple[Checker, Any]]) -> Dict[str, Any]:
    """Check the mapping ``raw`` against ``schema`` (key -> (checker, default)); return checked values."""
    allowed = ", ".join(schema)
    if not isinstance(raw, dict):
        src.fail(key or "(top level)", raw, "not a mapping", f"write `key: value` lines with keys {allowed}")
    for name in raw:
        if name not in schema:
            close = difflib.get_close_matches(str(name), list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            src.fail(_join(key, name), raw[name], f"unknown key {str(name)!r}{hint}", f"allowed keys: {allowed}")
    out: Dict[str, Any] = {}
    for name, (check, default) in schema.items():
        if name in raw:
            out[name] = check(src, _join(key, name), raw[name])
        elif default is _MISSING:
            src.fail(
                _join(key, name), _MISSING, "required key missing", f"add `{name}:` under {key or 'the top level'}"
            )
        elif default is not _ABSENT:
            out[name] = dict(default) if isinstance(default, dict) else default
    return out


_SOURCE: Dict[str, Tuple[Checker, Any]] = {
    "hardware": (_text, _MISSING),
    "software": (_text, _MISSING),
    "reference": (_text, _MISSING),
    "notes": (_text, ""),
}
_SETTINGS: Dict[str, Tuple[Checker, Any]] = {
    "input_size": (_int(1), _MISSING),
    "dataset_size": (_int(1), _MISSING),
    "epochs": (_int(1), _MISSING),
    "skip_epochs": (_int(0), _MISSING),
    "optimizer": (_optimizer, _MISSING),
    "classes": (_int(1), _MISSING),
    "extra": (_mapping, {}),
}
#: ``balance: planned`` in a row.
PLANNED = "planned"

_ROW_OVERRIDES: Dict[str, Tuple[Checker, Any]] = {
    "batch": (_int(1), _ABSENT),
    "chunks": (_int(1), _ABSENT),
    "balance": (_balance, _ABSENT),
    "model_args": (_model_args, {}),
    "note": (_text, _ABSENT),
}
_ROW: Dict[str, Tuple[Checker, Any]] = {
    "name": (_text, _MISSING),
    "mode": (_choice(*MODES), _MISSING),
    "devices": (_int(1), _MISSING),
    "batch": (_int(1), _MISSING),
    "chunks": (_int(1), 1),
    "balance": (_balance, None),
    "checkpoint": (_choice(*CHECKPOINTS), _ABSENT),
    "model_args": (_model_args, {}),
    "published": (_mapping, _MISSING),
    "note": (_text, ""),
}
# compare.predicted: the published rows predicted on a hardware preset beside the published speedups
# (gpipe-bench predict); check: whether compare --check fails when a prediction leaves the tolerance.
_PREDICTED: Dict[str, Tuple[Checker, Any]] = {
    "hardware": (_text, _MISSING),
    "calibrate": (_text, ""),
    "check": (_flag, False),
}
_COMPARE: Dict[str, Tuple[Checker, Any]] = {
    "tolerance": (_fraction, _MISSING),
    "predicted": (lambda s, k, v: _fields(s, k, v, _PREDICTED), {}),
}
_TABLE: Dict[str, Tuple[Checker, Any]] = {
    "name": (_text, _MISSING),
    "title": (_text, _MISSING),
    "kind": (_choice(*KINDS), _MISSING),
    "metric": (_text, _MISSING),
    "unit": (_text, _MISSING),
    "higher_is_better": (_flag, _MISSING),
    "baseline": (_text, _MISSING),
    "model": (_text, _MISSING),
    "model_args": (_model_args, {}),
    "source": (lambda s, k, v: _fields(s, k, v, _SOURCE), _MISSING),
    "compare": (lambda s, k, v: _fields(s, k, v, _COMPARE), _MISSING),
    "settings": (lambda s, k, v: _fields(s, k, v, _SETTINGS), _MISSING),
    "rows": (lambda s, k, v: v, _MISSING),
    "profiles": (_mapping, _MISSING),
}


# -- semantic checks --------------------------------------------------------------------------------

_LENGTHS: Dict[Tuple[str, str], Optional[int]] = {}


def _model_length(src: _Src, key: str, model: str, args: Mapping[str, Any], classes: int) -> Optional[int]:
    """Layers of ``model(**args)`` (built on meta, cached).

    A model that cannot be imported (a broken torchvision) is an error here: the
    balance-sum check must never be skipped silently.
    """
    cache_key = (model, repr(sorted({**args, "num_classes": classes}.items())))
    if cache_key not in _LENGTHS:
        try:
            _LENGTHS[cache_key] = models.count(model, **args, num_classes=classes)[0]
        except ImportError as exc:
            raise ConfigError(
                f"{src.short}: model {model} cannot be built to check the balances ({exc}); "
                "repair the installation (pip install -e . or make install)"
            ) from None
        except (TypeError, ValueError) as exc:
            src.fail(key, dict(args), f"{model} rejects these arguments ({exc})", "fix the model arguments")
    return _LENGTHS[cache_key]


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated by ``over``, mappings merged key by key (lists are replaced)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fixed(*values: Any) -> Checker:
    """A value that describes what the harness does: only the one it implements is accepted."""

    def check(src: _Src, key: str, value: Any) -> Any:
        if value not in values:
            src.fail(key, value, "not what the harness does", f"write {_show(values[0])} (the only method implemented)")
        return value

    return check


def _number(src: _Src, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        src.fail(key, value, "not a number", "write a number")
    return float(value)


def _epochs_at(src: _Src, key: str, value: Any) -> List[float]:
    """Epochs (fractions allowed) in increasing order: a learning-rate schedule's milestones."""
    if not isinstance(value, list):
        src.fail(key, value, "not a list of epochs", "write e.g. [30, 60, 80] or [0.67, 1.33]")
    out = [_at_least_zero(src, f"{key}[{i}]", v) for i, v in enumerate(value)]
    if out != sorted(out):
        src.fail(key, value, "not in increasing order", "write the milestones from first to last")
    return out


def _at_least_zero(src: _Src, key: str, value: Any) -> float:
    number = _number(src, key, value)
    if number < 0:
        src.fail(key, value, "must not be negative", "write a number >= 0 (epochs)")
    return number


#: ``settings.extra`` per table kind: every key something reads (or describes what the harness does, checked).
_EXTRA: Dict[str, Dict[str, Tuple[Checker, Any]]] = {
    "speed": {"data": (_fixed("fixed-batch"), _ABSENT)},
    "memory": {
        "steps": (_int(1), _ABSENT),
        "bytes_per_parameter": (_int(1), _ABSENT),
        "parameter_copies": (_int(1), _ABSENT),
        "find_balance": (_fixed("balance_by_size"), _ABSENT),
    },
    "accuracy": {
        "dataset": (_choice("fashion-mnist", "imagenet"), _ABSENT),
        "val_size": (_int(1), _ABSENT),
        "val_resize": (_int(1), _ABSENT),
        "lr_scale_batch": (_int(1), _ABSENT),
        "warmup_epochs": (_at_least_zero, _ABSENT),
        "warmup_step": (_fixed("iteration"), _ABSENT),
        "lr_milestones": (_epochs_at, _ABSENT),
        "lr_gamma": (_number, _ABSENT),
        "normalize": (_mapping, _ABSENT),
        "deferred_batch_norm": (_flag, _ABSENT),
        "memory_format": (_choice("contiguous", "channels_last"), _ABSENT),
        "runs": (_int(1), _ABSENT),
        "train_transforms": (
            _typed(list, "not a list", "write e.g. [random_crop, horizontal_flip, normalize]"),
            _ABSENT,
        ),
        "val_transforms": (_typed(list, "not a list", "write e.g. [normalize]"), _ABSENT),
        "error": (_fixed("100 x (1 - accuracy) on the validation set"), _ABSENT),
        "reference": (_mapping, _ABSENT),  # the source's own reference figure, for readers of the config
    },
}

#: What ``settings.extra`` means when a key is left out: the one home of these defaults (:func:`extra_value`).
EXTRA_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "speed": {},
    "memory": {"steps": 2, "bytes_per_parameter": 4, "parameter_copies": 3},
    "accuracy": {
        "dataset": "fashion-mnist",
        "val_size": 1000,
        "val_resize": 256,
        "lr_scale_batch": 256,
        "warmup_epochs": 0,
        "lr_milestones": [],
        "lr_gamma": 0.1,
        "deferred_batch_norm": False,
        "memory_format": "contiguous",
        "runs": 3,
    },
}


def extra_value(kind: str, extra: Mapping[str, Any], key: str) -> Any:
    """``extra[key]``, or its default for a ``kind`` table (:data:`EXTRA_DEFAULTS`)."""
    if key in extra:
        return extra[key]
    defaults = EXTRA_DEFAULTS.get(kind, {})
    if key not in defaults:
        raise KeyError(f"settings.extra.{key} has no default for {kind} tables")
    return defaults[key]


#: The augmentations the harness implements per dataset (measure/accuracy.py, data/), the default first:
#: a config that names others is wrong. Fashion-MNIST may leave out the random crop (short runs converge
#: faster without it).
_TRANSFORMS: Dict[str, Dict[str, List[List[str]]]] = {
    "imagenet": {
        "train_transforms": [["random_resized_crop", "horizontal_flip", "normalize"]],
        "val_transforms": [["resize", "center_crop", "normalize"]],
    },
    "fashion-mnist": {
        "train_transforms": [["random_crop", "horizontal_flip", "normalize"], ["horizontal_flip", "normalize"]],
        "val_transforms": [["normalize"]],
    },
}


def transforms(extra: Mapping[str, Any], name: str) -> List[str]:
    """``extra[name]`` (``train_transforms`` or ``val_transforms``), or the dataset's default."""
    return list(extra.get(name, _TRANSFORMS[str(extra.get("dataset", "fashion-mnist"))][name][0]))


def _check_extra(src: _Src, key: str, kind: str, extra: Mapping[str, Any]) -> None:
    """Every ``settings.extra`` key is one the harness reads, with a value it implements."""
    checked = _fields(src, key, dict(extra), _EXTRA.get(kind, {}))
    if kind == "accuracy":
        implemented = _TRANSFORMS[str(checked.get("dataset", "fashion-mnist"))]
        for name, allowed in implemented.items():
            if name in checked and checked[name] not in allowed:
                src.fail(
                    f"{key}.{name}",
                    checked[name],
                    "not an augmentation the harness applies for this dataset",
                    "write " + " or ".join(_show(a) for a in allowed),
                )


def _check_settings(src: _Src, key: str, s: Settings) -> None:
    if s.skip_epochs >= s.epochs:
        src.fail(
            _join(key, "skip_epochs"),
            s.skip_epochs,
            f"not less than epochs ({s.epochs}): nothing would be measured",
            f"use skip_epochs <= {s.epochs - 1} or more epochs",
        )


def _check_row(src: _Src, key: str, table: Mapping[str, Any], row: Row, settings: Settings) -> None:
    """The rules that tie a row's values together (types are already checked)."""

    def k(field: str) -> str:  # k("chunks") -> "rows.pipeline-8.chunks"
        return f"{key}.{field}"

    if row.mode != "pipeline" and row.chunks != 1:
        src.fail(
            k("chunks"),
            row.chunks,
            f"{row.mode} rows have no micro-batches",
            "set chunks: 1 (micro-batching is what pipeline rows do)",
        )
    if row.mode != "pipeline" and row.checkpoint != "never":
        src.fail(
            k("checkpoint"),
            row.checkpoint,
            f"{row.mode} rows run the plain model",
            "set checkpoint: never (pipeline rows checkpoint)",
        )
    if row.chunks > row.batch:
        src.fail(
            k("chunks"),
            row.chunks,
            f"more micro-batches than samples in the batch ({row.batch})",
            f"use chunks <= {row.batch}",
        )
    if row.batch > settings.dataset_size:
        src.fail(
            k("batch"),
            row.batch,
            f"larger than dataset_size ({settings.dataset_size}): an epoch has no step",
            f"use batch <= {settings.dataset_size} or a larger settings.dataset_size",
        )
    length = _model_length(src, k("model_args"), table["model"], row.model_args, settings.classes)
    if row.planned:
        if row.mode != "pipeline" or table["kind"] != "speed":
            src.fail(
                k("balance"),
                PLANNED,
                f"only pipeline rows of speed tables are planned (this is a {row.mode} row of a {table['kind']} table)",
                "give the layer counts",
            )
        if length is not None and row.devices > length:
            src.fail(k("devices"), row.devices, f"more partitions than {length} layers", f"use at most {length}")
        if row.balance is None:
            return
    if row.balance is None:
        if row.mode == "pipeline" or (row.mode == "naive" and row.devices > 1):
            if table["kind"] != "memory":
                src.fail(
                    k("balance"),
                    None,
                    f"a {row.mode} row over {row.devices} device(s) needs a balance",
                    f"give {row.devices} layer counts summing to {length} (only memory tables leave it to balance_by_size)",
                )
        return
    if row.mode == "dataparallel":
        src.fail(k("balance"), row.balance, "data-parallel rows replicate the whole model", "remove the balance (null)")
    if len(row.balance) != row.devices:
        src.fail(
            k("balance"),
            row.balance,
            f"{len(row.balance)} partitions for {row.devices} devices",
            f"give {row.devices} entries, or devices: {len(row.balance)}",
        )
    if length is not None and sum(row.balance) != length:
        args = ", ".join(f"{a}={v}" for a, v in row.model_args.items())
        src.fail(
            k("balance"),
            row.balance,
            f"sums to {sum(row.balance)} but {table['model']}({args}) has {length} layers",
            f"make the entries sum to {length}",
        )


# -- loading ----------------------------------------------------------------------------------------


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
    return Path(env) if env else Path(__file__).resolve().parent / "configs"


def table_names() -> List[str]:
    """Names of the tables in :func:`config_dir`, sorted."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def _read(path: Path) -> Any:
    src = _Src(str(path))
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


def load(name_or_path: str) -> Table:
    """The table named ``name_or_path`` in :func:`config_dir`, or the YAML file at that path; validated whole."""
    looks_like_path = os.sep in name_or_path or "/" in name_or_path or name_or_path.endswith((".yaml", ".yml"))
    path = Path(name_or_path) if looks_like_path else config_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        _Src(str(config_dir() if not looks_like_path else path)).fail(
            "table", name_or_path, "no such config", f"use one of: {', '.join(table_names())}, or a path to a YAML file"
        )
    path = path.resolve()
    src = _Src(str(path))
    top = _fields(src, "", _read(path), _TABLE)
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
    for required in _REQUIRED_PROFILES:
        if required not in raw_profiles:
            src.fail(
                f"profiles.{required}",
                _MISSING,
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


def _rows(src: _Src, raw: Any) -> Dict[str, Dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        src.fail("rows", raw, "not a list of rows", "write one `- name: ...` entry per published row")
    rows: Dict[str, Dict[str, Any]] = {}
    for i, entry in enumerate(raw):
        label = (
            f"rows.{entry['name']}" if isinstance(entry, dict) and isinstance(entry.get("name"), str) else f"rows[{i}]"
        )
        row = _fields(src, label, entry, _ROW)
        if row["name"] in rows:
            src.fail(f"{label}.name", row["name"], "a second row of that name", "give every row its own name")
        rows[row["name"]] = row
    return rows


def _profile(src: _Src, top: Mapping[str, Any], rows: Mapping[str, Dict[str, Any]], name: str, raw: Any) -> Profile:
    key = f"profiles.{name}"
    schema: Dict[str, Tuple[Checker, Any]] = {"description": (_text, _MISSING)}
    if name != "published":  # the published profile is the table itself
        schema.update(
            settings=(_mapping, {}), model_args=(_model_args, {}), rows=(_mapping, {}), model=(_text, _ABSENT)
        )
    given = _fields(src, key, raw, schema)
    model = given.get("model", top["model"])
    if model not in models.names():
        src.fail(f"{key}.model", model, "unknown model", f"use one of: {', '.join(models.names())}")
    top = {**top, "model": model}
    settings = Settings(
        **_fields(src, f"{key}.settings", _merge(top["settings"], given.get("settings", {})), _SETTINGS)
    )
    _check_settings(src, f"{key}.settings" if given.get("settings") else "settings", settings)
    _check_extra(
        src,
        f"{key}.settings.extra" if given.get("settings", {}).get("extra") else "settings.extra",
        top["kind"],
        settings.extra,
    )
    model_args = _merge(top["model_args"], given.get("model_args", {}))
    overrides = given.get("rows", {})
    for row_name in overrides:
        if row_name not in rows:
            src.fail(f"{key}.rows.{row_name}", overrides[row_name], "no such row", f"use one of: {', '.join(rows)}")
    built = []
    for row_name, base in rows.items():
        over = _fields(src, f"{key}.rows.{row_name}", overrides.get(row_name, {}), _ROW_OVERRIDES)
        merged = {**base, **over}
        merged["model_args"] = _merge(
            _merge(_merge(top["model_args"], base["model_args"]), given.get("model_args", {})), over["model_args"]
        )
        merged.setdefault("checkpoint", "except_last" if base["mode"] == "pipeline" else "never")
        merged["published"] = Published(base["published"])
        if merged.get("balance") == PLANNED:
            merged["balance"], merged["planned"] = None, True
        row = Row(**merged)
        _check_row(src, f"{key}.rows.{row_name}" if name != "published" else f"rows.{row_name}", top, row, settings)
        built.append(row)
    return Profile(
        name=name,
        description=given["description"],
        settings=settings,
        rows=tuple(built),
        model_args=model_args,
        model=model,
    )


# -- choosing a row, overriding it ------------------------------------------------------------------


def find_row(
    table: Table,
    *,
    pipeline: Optional[int] = None,
    naive: Optional[int] = None,
    experiment: Optional[str] = None,
    profile: str = "published",
) -> Row:
    """The row asked for by ``--pipeline N``, ``--naive N`` or ``--experiment NAME`` (exactly one)."""
    src = _Src(table.path)
    asked = [
        (flag, v)
        for flag, v in (("--pipeline", pipeline), ("--naive", naive), ("--experiment", experiment))
        if v is not None
    ]
    if len(asked) != 1:
        src.fail(
            "row",
            ", ".join(f"{f} {v}" for f, v in asked) or _MISSING,
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
    src = _Src(table.path, " (after overrides)")
    key = f"rows.{row.name}"
    model = model or table.model
    given = {f: v for f, v in vars(overrides).items() if v is not None}
    row = replace(row, **{f: _ROW[f][0](src, f"{key}.{f}", v) for f, v in given.items() if f in _ROW})
    if "balance" in given:  # a balance given replaces a planned one
        row = replace(row, planned=False)
    settings = replace(
        settings, **{f: _SETTINGS[f][0](src, f"settings.{f}", v) for f, v in given.items() if f in _SETTINGS}
    )
    _check_settings(src, "settings", settings)
    _check_row(src, key, {"model": model, "kind": table.kind}, row, settings)
    return row, settings
