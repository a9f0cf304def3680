"""The checker every config value goes through: one :class:`ConfigError` line per mistake.

Why here, and hand-written: a user who mistypes a key or a value gets one line
naming the file, the key, the bad value and the fix (exit code 2), never a
traceback or a page of schema-library output. Every other module of the
package describes what it allows as ``key -> (checker, default)`` and lets
:func:`check_fields` walk it, so the wording of a mistake is the same whatever
level of the file it sits at.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, NoReturn, Tuple

from gpipe_bench.errors import HarnessError

__all__ = [
    "ABSENT",
    "MISSING",
    "Checker",
    "ConfigError",
    "Schema",
    "Source",
    "at_least_zero",
    "check_fields",
    "choice",
    "epochs_at",
    "fixed",
    "flag",
    "fraction",
    "integer",
    "join",
    "mapping",
    "number",
    "show",
    "spell_flag",
    "text",
    "typed",
]

#: A required key: no default.
MISSING: Any = object()
#: An optional key with no default: left out when not given.
ABSENT: Any = object()


class ConfigError(HarnessError):
    """A mistake the user can fix in a config or an option: one line naming file, key, value and the fix. Exit 2."""


def show(value: Any) -> str:
    """A value as YAML would spell it, on one line, cut at 80 characters."""
    if value is MISSING:
        return "(missing)"
    if value is None or isinstance(value, bool):
        spelt = "null" if value is None else str(value).lower()
    else:
        spelt = repr(value) if isinstance(value, str) else str(list(value) if isinstance(value, tuple) else value)
    spelt = " ".join(spelt.split())
    return spelt if len(spelt) <= 80 else spelt[:77] + "..."


def spell_flag(value: Any) -> str:
    """A value as a command-line flag takes it (``--balance 100,270``)."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class Source:
    """Where values come from: the file, a tag such as " (after overrides)", and the flags that set some of them.

    A value a command-line flag gave is named by that flag (``--skip-epochs 3``), without
    the file: the user typed the flag, not the config key it overrides. A fix names the
    flag of any key one can set (``flags``), so the user is told what to type.
    """

    path: str
    tag: str = ""
    #: dotted key -> the flag that sets it, for the keys a command line can override
    flags: Mapping[str, str] = field(default_factory=dict)
    #: the keys whose value a flag gave
    given: FrozenSet[str] = frozenset()

    def fail(self, key: str, value: Any, problem: str, fix: str) -> NoReturn:
        if key in self.given:
            raise ConfigError(f"{self.flags[key]} {spell_flag(value)}: {problem}; {fix}")
        raise ConfigError(f"{self.short}: {key} = {show(value)}{self.tag}: {problem}; {fix}")

    def from_flag(self, key: str) -> bool:
        """Whether a command-line flag gave ``key``'s value."""
        return key in self.given

    def at_most(self, key: str, limit: int) -> str:
        """The fix "no more than ``limit``", spelt as the user sets ``key``: ``--chunks 32 or less``, ``chunks <= 32``."""
        flag = self.flags.get(key)
        if flag is None:
            return f"{key.rsplit('.', 1)[-1]} <= {limit}"
        return f"{flag} {limit}" + (" or less" if limit > 0 else "")

    def at_least(self, key: str, limit: int) -> str:
        """The fix "at least ``limit``", spelt as the user sets ``key``: ``--epochs 2 or more``, ``epochs >= 2``."""
        flag = self.flags.get(key)
        return f"{key.rsplit('.', 1)[-1]} >= {limit}" if flag is None else f"{flag} {limit} or more"

    @property
    def short(self) -> str:  # the path relative to the working directory when below it
        rel = os.path.relpath(self.path)
        return self.path if rel.startswith("..") else rel


#: Checks one value (the source and the dotted key name it in an error) and returns it as the harness keeps it.
Checker = Callable[[Source, str, Any], Any]
#: Allowed keys of one mapping: key -> (checker, default, or MISSING / ABSENT).
Schema = Mapping[str, Tuple[Checker, Any]]


def join(prefix: str, key: Any) -> str:
    """The dotted name of ``key`` under ``prefix`` (``settings`` + ``epochs`` -> ``settings.epochs``)."""
    return f"{prefix}.{key}" if prefix else str(key)


def integer(minimum: int = 1) -> Checker:
    """A whole number of at least ``minimum`` (a boolean is not one, though Python says so)."""

    def check(src: Source, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            src.fail(key, value, "not a whole number", f"write an integer >= {minimum}")
        if value < minimum:
            src.fail(key, value, f"must be at least {minimum}", f"write an integer >= {minimum}")
        return value

    return check


def choice(*options: str) -> Checker:
    """One of ``options``."""

    def check(src: Source, key: str, value: Any) -> str:
        if value not in options:
            src.fail(key, value, "unknown value", f"use one of: {', '.join(options)}")
        return str(value)

    return check


def typed(kind: type, problem: str, fix: str) -> Checker:
    """Any instance of ``kind``; ``problem`` and ``fix`` word the error otherwise."""

    def check(src: Source, key: str, value: Any) -> Any:
        if not isinstance(value, kind):
            src.fail(key, value, problem, fix)
        return value

    return check


text = typed(str, "not a string", "write text (quote it if YAML reads it as something else)")
flag = typed(bool, "not a boolean", "write true or false")


def fixed(*values: Any) -> Checker:
    """A value that describes what the harness does: only the one it implements is accepted."""

    def check(src: Source, key: str, value: Any) -> Any:
        if value not in values:
            src.fail(key, value, "not what the harness does", f"write {show(values[0])} (the only method implemented)")
        return value

    return check


def fraction(src: Source, key: str, value: Any) -> float:
    """A relative tolerance: a number between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        src.fail(key, value, "not a number between 0 and 1", "write a relative tolerance such as 0.10")
    return float(value)


def number(src: Source, key: str, value: Any) -> float:
    """Any number (not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        src.fail(key, value, "not a number", "write a number")
    return float(value)


def at_least_zero(src: Source, key: str, value: Any) -> float:
    """A number of epochs, fractions allowed: not negative."""
    epochs = number(src, key, value)
    if epochs < 0:
        src.fail(key, value, "must not be negative", "write a number >= 0 (epochs)")
    return epochs


def epochs_at(src: Source, key: str, value: Any) -> Tuple[float, ...]:
    """Epochs (fractions allowed) in increasing order: a learning-rate schedule's milestones."""
    if not isinstance(value, list):
        src.fail(key, value, "not a list of epochs", "write e.g. [30, 60, 80] or [0.67, 1.33]")
    out: List[float] = [at_least_zero(src, f"{key}[{i}]", v) for i, v in enumerate(value)]
    if out != sorted(out):
        src.fail(key, value, "not in increasing order", "write the milestones from first to last")
    return tuple(out)


def mapping(src: Source, key: str, value: Any) -> Dict[str, Any]:
    """``name: value`` entries with text names (a copy)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        src.fail(key, value, "not a mapping", "write `name: value` entries (or {} for none)")
    return dict(value)


def check_fields(src: Source, key: str, raw: Any, schema: Schema) -> Dict[str, Any]:
    """Check the mapping ``raw`` against ``schema`` (key -> (checker, default)); return checked values.

    Unknown keys are refused (naming the closest allowed one), so a typo never
    leaves a setting silently at its default.
    """
    allowed = ", ".join(schema)
    if not isinstance(raw, dict):
        src.fail(key or "(top level)", raw, "not a mapping", f"write `key: value` lines with keys {allowed}")
    for name in raw:
        if name not in schema:
            close = difflib.get_close_matches(str(name), list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            src.fail(join(key, name), raw[name], f"unknown key {str(name)!r}{hint}", f"allowed keys: {allowed}")
    out: Dict[str, Any] = {}
    for name, (check, default) in schema.items():
        if name in raw:
            out[name] = check(src, join(key, name), raw[name])
        elif default is MISSING:
            src.fail(join(key, name), MISSING, "required key missing", f"add `{name}:` under {key or 'the top level'}")
        elif default is not ABSENT:
            out[name] = dict(default) if isinstance(default, dict) else default
    return out
