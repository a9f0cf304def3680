"""Experiment configs: ``gpipe_bench/configs/*.yaml`` (package data) -> frozen, validated dataclasses.

Why: every number of a published row lives in a YAML file (data) and reaches
the harness through here only (code). A config is checked whole at load time,
and again after command-line overrides, so no run starts from a bad setting;
every mistake a user can make is one :class:`ConfigError` line naming the file,
the key, the bad value and the fix (exit code 2). The schemas of
:mod:`~gpipe_bench.config.layout` (and, for ``settings.extra``, of
:mod:`~gpipe_bench.config.kinds`) are the list of allowed keys; the YAML files
explain each one.

Profiles: ``published`` is the table as printed; ``quick`` (or any other) may
override settings, the model (a smaller one of the same family), model args
and, per row, batch, chunks, balance, model_args and note; rows keep their
names, modes, devices and checkpoint modes. Model args merge table -> row ->
profile -> profile row into :attr:`Row.model_args`; the class count is
``settings.classes``, never a model arg. Only a memory table may leave a
multi-device row's balance null (found by ``balance_by_size``).

The modules, one concept each:

- :mod:`.types`: what a loaded table is (Table, Profile, Row, Settings, Overrides and the flag of each override);
- :mod:`.schema`: the checker and its one-line ConfigError;
- :mod:`.layout`: which keys each level of a table file may hold;
- :mod:`.rules`: the rules that tie values together (a balance against the model's length);
- :mod:`.kinds`: each table kind's ``settings.extra`` as a typed dataclass;
- :mod:`.loader`: reading and validating a table file;
- :mod:`.rows`: choosing a row and applying command-line overrides;
- :mod:`.plain`: a speed table for any registered model, its plain model only.
"""

from __future__ import annotations

from .kinds import KIND_SETTINGS, AccuracySettings, KindSettings, MemorySettings, SpeedSettings
from .layout import PLANNED
from .loader import config_dir, load, table_names
from .plain import plain_table
from .rows import NAMED, apply, find_row, overridden
from .schema import ConfigError
from .types import (
    CHECKPOINTS,
    FLAGS,
    KINDS,
    MODES,
    Checkpoint,
    Kind,
    Mode,
    Overrides,
    Profile,
    Published,
    Row,
    Settings,
    Table,
)

__all__ = [
    "PLANNED",
    "NAMED",
    "overridden",
    "ConfigError",
    "Published",
    "Row",
    "Settings",
    "Profile",
    "Table",
    "Overrides",
    "FLAGS",
    "table_names",
    "config_dir",
    "load",
    "plain_table",
    "find_row",
    "apply",
    "KINDS",
    "MODES",
    "CHECKPOINTS",
    "Kind",
    "Mode",
    "Checkpoint",
    "KindSettings",
    "SpeedSettings",
    "MemorySettings",
    "AccuracySettings",
    "KIND_SETTINGS",
]
