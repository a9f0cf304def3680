"""Result records: one measured table row, with the environment that produced it.

A measurement can take hours; its record is the only thing that survives the
run, so it is written whole or not at all (a temporary file in the target
directory, fsync, then an atomic rename) and carries everything needed to judge
it later: exact settings, versions, the machine, the date. Rendering and
comparison (:mod:`gpipe_bench.report`) are separate steps over saved records.

Records live at ``<root>/<table>/<profile>/<hardware_key>/<experiment>.json``
(``<experiment>--<engine>.json`` for engines other than ours, ``--<precision>``
added for precisions other than fp32, and ``--<settings>`` for a run whose
settings differ from its row's), so results from different hardware, engines,
precisions or settings never share a path and a re-run replaces exactly one file.

A record's name is a promise about its settings. A run given another batch,
chunks, balance or checkpoint mode than its config row (an accuracy run: other
epochs; partitions sharing devices) records what it changed in
``settings["overrides"]`` (:attr:`gpipe_bench.jobs.Job.overrides`) and is saved
under the row's name plus a tag of those settings, in a fixed order:
``batch64``, ``chunks4``, ``balance192-178``, ``checkpoint-never``,
``epochs2``, ``devices1`` (distinct devices shared by the partitions), joined
by ``-``: ``pipeline-2--chunks4-balance192-178-checkpoint-never.json``. It never
replaces the row's record, and the reports show it apart (:func:`settings_label`).
Records made before overrides were recorded have none and keep their names.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, get_args

from .environment import environment, hardware_key, now
from .errors import HarnessError
from .precision import DEFAULT as DEFAULT_PRECISION

__all__ = [
    "SCHEMA",
    "STATUSES",
    "DEFAULT_ENGINE",
    "Result",
    "summarize",
    "created_at",
    "environment",
    "hardware_key",
    "results_dir",
    "path_for",
    "OVERRIDE_ORDER",
    "settings_tag",
    "settings_label",
    "save",
    "load_all",
]

#: Version of the JSON layout; a reader refuses records from a newer writer.
SCHEMA = 1
#: A record's outcome: measured, out of memory, stopped before all seeds, failed, or sized without running.
Status = Literal["ok", "oom", "interrupted", "error", "predicted"]
STATUSES: Tuple[Status, ...] = get_args(Status)
DEFAULT_ENGINE = "gpipe-bench"

_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """The spread of ``samples``: min, max, median and (sample) std; empty for no samples."""
    if not samples:
        return {}
    values = [float(s) for s in samples]
    mean = math.fsum(values) / len(values)
    # By hand rather than statistics.stdev, which raises on a NaN instead of propagating it.
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"min": min(values), "max": max(values), "median": statistics.median(values), "std": math.sqrt(var)}


@dataclass
class Result:
    """One measured row of one table, on one machine, by one engine."""

    table: str
    experiment: str
    profile: str
    engine: str  # "gpipe-bench" | "torchgpipe" | "plain"
    kind: str  # "speed" | "memory" | "accuracy"
    metric: str
    unit: str
    value: Optional[float]  # the headline figure; None when status != "ok"
    status: Status
    samples: List[float] = field(default_factory=list)
    spread: Dict[str, float] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)
    environment: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=now)

    def hardware_key(self) -> str:
        """A stable, filesystem-safe slug of the machine: see :func:`hardware_key`."""
        return hardware_key(self.environment)

    @property
    def overrides(self) -> Dict[str, Any]:
        """What the run changed of its config row's settings (empty: it ran the row as configured)."""
        changed = self.settings.get("overrides")
        return dict(changed) if isinstance(changed, dict) else {}

    @property
    def precision(self) -> str:
        """The precision the row ran in (records made before precisions were recorded ran in fp32)."""
        return str(self.settings.get("precision", DEFAULT_PRECISION))

    def to_json(self) -> Dict[str, Any]:
        """A JSON-ready dict: the fields plus ``schema``."""
        record = asdict(self)
        record["schema"] = SCHEMA
        return record

    @classmethod
    def from_json(cls, data: Any) -> "Result":
        """Rebuild a record; :class:`ValueError` naming the first field that is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        schema = data.get("schema", SCHEMA)
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise ValueError(f"'schema' is not an integer: {schema!r}")
        if schema > SCHEMA:
            raise ValueError(f"schema {schema} is newer than this gpipe-bench reads ({SCHEMA}); upgrade gpipe-bench")
        kwargs: Dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                raise ValueError(f"missing field {f.name!r}")
            kwargs[f.name] = data[f.name]
        for name in ("table", "experiment", "profile", "engine", "kind", "metric", "unit", "status", "created"):
            if not isinstance(kwargs[name], str):
                raise ValueError(f"field {name!r} is not a string: {kwargs[name]!r}")
        if kwargs["status"] not in STATUSES:
            raise ValueError(f"field 'status' is {kwargs['status']!r}, not one of {', '.join(STATUSES)}")
        value = kwargs["value"]
        if value is not None and not _is_number(value):
            raise ValueError(f"field 'value' is not a number or null: {value!r}")
        kwargs["value"] = None if value is None else float(value)
        samples = kwargs["samples"]
        if not isinstance(samples, list) or not all(_is_number(s) for s in samples):
            raise ValueError("field 'samples' is not a list of numbers")
        kwargs["samples"] = [float(s) for s in samples]
        spread = kwargs["spread"]
        if not isinstance(spread, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in spread.items()):
            raise ValueError("field 'spread' is not an object of numbers")
        kwargs["spread"] = {k: float(v) for k, v in spread.items()}
        for name in ("settings", "environment", "extra"):
            if not isinstance(kwargs[name], dict):
                raise ValueError(f"field {name!r} is not an object")
        return cls(**kwargs)


def created_at(result: Result) -> datetime:
    """When ``result`` was made, as an aware datetime: records compare by time, not by their text.

    Records carry ISO 8601 with an offset (``+00:00`` now; older ones ``+0100``
    style, local time). One without an offset is taken as UTC.
    """
    text = result.created.strip()
    for parse in (datetime.fromisoformat, lambda t: datetime.strptime(t, "%Y-%m-%dT%H:%M:%S%z")):
        try:
            when = parse(text)
        except ValueError:
            continue
        return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)
    return datetime.min.replace(tzinfo=timezone.utc)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# -- storage -------------------------------------------------------------------------------------------------------


def results_dir() -> Path:
    """Where results live: ``./results`` of the working directory, or ``$GPIPE_BENCH_RESULTS``.

    Not beside the package: an installed package's folder is no place for a
    user's measurements (and may not be writable). From this repository's root
    that is the committed ``results/``.
    """
    override = os.environ.get("GPIPE_BENCH_RESULTS")
    if override:
        return Path(override).expanduser()
    return Path.cwd() / "results"


#: The order of a settings tag's parts; anything else a record says it changed comes after, by name.
OVERRIDE_ORDER = ("batch", "chunks", "balance", "checkpoint", "epochs", "devices")


def _ordered(overrides: Dict[str, Any]) -> List[Tuple[str, Any]]:
    known = [(k, overrides[k]) for k in OVERRIDE_ORDER if k in overrides]
    return known + sorted((k, v) for k, v in overrides.items() if k not in OVERRIDE_ORDER)


def _value_text(value: Any, sep: str) -> str:
    return sep.join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def settings_tag(overrides: Dict[str, Any]) -> str:
    """The file-name tag of ``overrides``: ``chunks4-balance192-178-checkpoint-never`` ("" for none).

    Deterministic (a fixed order, see the module docstring) and readable; numbers
    follow their name, a word follows it after ``-``.
    """
    parts = []
    for name, value in _ordered(overrides):
        text = _value_text(value, "-")
        parts.append(f"{name}{text}" if text[:1].isdigit() else f"{name}-{text}")
    return "-".join(parts)


def settings_label(overrides: Dict[str, Any]) -> str:
    """How the reports name what a run changed: ``balance 192,178, checkpoint never`` ("" for none)."""
    return ", ".join(f"{name} {_value_text(value, ',')}" for name, value in _ordered(overrides))


def path_for(result: Result, root: Path) -> Path:
    """``root/<table>/<profile>/<hardware_key>/<experiment>[--<engine>][--<precision>][--<settings>].json``.

    A row run in another engine, precision or with other settings (:func:`settings_tag`)
    never replaces the row's own record.
    """
    name = result.experiment if result.engine == DEFAULT_ENGINE else f"{result.experiment}--{result.engine}"
    if result.precision != DEFAULT_PRECISION:
        name = f"{name}--{result.precision}"
    if result.overrides:
        name = f"{name}--{settings_tag(result.overrides)}"
    parts = [result.table, result.profile, result.hardware_key(), name]
    for part in parts:
        # Names come from configs; one that could escape root or collide is a bug, not a user error.
        if not _SAFE_COMPONENT.match(part) or ".." in part:
            raise ValueError(f"unsafe path component {part!r} in result {result.table}/{result.experiment}")
    return Path(root).joinpath(*parts[:-1], f"{name}.json")


def _unwritable(directory: Path, error: OSError) -> HarnessError:
    reason = error.strerror or type(error).__name__
    where = error.filename if isinstance(error.filename, str) and error.filename else str(directory)
    return HarnessError(
        f"--results DIR: cannot write to {where} ({reason}); choose a writable directory "
        "(--results DIR or GPIPE_BENCH_RESULTS)"
    )


def check_writable(root: Path) -> None:
    """Fail before a long measurement, not after it, when ``root`` cannot take results."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as error:
        raise _unwritable(root, error) from None


def save(result: Result, root: Optional[Path] = None) -> Path:
    """Write ``result`` atomically under ``root`` (default :func:`results_dir`); return its path.

    Raises :class:`~gpipe_bench.errors.HarnessError` (one line, naming the directory) when the
    directory cannot be created or written. Whatever fails, the target is either
    the complete new record or untouched, and no temporary file is left.
    """
    path = path_for(result, results_dir() if root is None else Path(root))
    # Serialise first: a record that cannot be encoded is a bug and must not touch the disk.
    text = json.dumps(result.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(directory, error) from None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.stem}.", suffix=".tmp")
    except OSError as error:
        raise _unwritable(directory, error) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make committed results private
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise _unwritable(directory, error) from None
        raise
    _fsync_dir(directory)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_all(
    root: Optional[Path] = None,
    *,
    table: Optional[str] = None,
    profile: Optional[str] = None,
    hardware: Optional[str] = None,
    on_skip: Optional[Callable[[Path, str], None]] = None,
) -> List[Result]:
    """Every record under ``root`` (recursively), filtered.

    A file that is not a record is skipped; ``on_skip(path, reason)`` hears of it
    (the command line prints a warning line).
    """
    base = results_dir() if root is None else Path(root)
    if not base.is_dir():
        return []
    found: List[Result] = []
    for path in sorted(base.rglob("*.json")):
        if not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as f:
                result = Result.from_json(json.load(f))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            if on_skip is not None:
                on_skip(path, " ".join(str(error).split())[:200])
            continue
        if table is not None and result.table != table:
            continue
        if profile is not None and result.profile != profile:
            continue
        if hardware is not None and result.hardware_key() != hardware:
            continue
        found.append(result)
    return found
