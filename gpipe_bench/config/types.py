"""What a loaded table is: frozen dataclasses, so nothing downstream can change a validated config.

The loader (:mod:`gpipe_bench.config.loader`) builds these once per table and
:func:`gpipe_bench.config.rows.apply` makes changed copies; every other module
of the harness only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Literal, Mapping, Optional, Tuple, get_args

from gpipe_bench.precision import DEFAULT as DEFAULT_PRECISION

from .schema import Source

__all__ = [
    "CHECKPOINTS",
    "FLAGS",
    "KINDS",
    "MODES",
    "Checkpoint",
    "Kind",
    "Mode",
    "Overrides",
    "Profile",
    "Published",
    "Row",
    "Settings",
    "Table",
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
    #: fp32 | tf32 | bf16 | fp16 (:mod:`gpipe_bench.precision`): the published rows are fp32
    precision: str = DEFAULT_PRECISION


@dataclass(frozen=True)
class Settings:
    """Settings common to every row of a table, as merged for one profile.

    ``extra`` is the table kind's own settings as written (records print it);
    read them typed through :mod:`gpipe_bench.config.kinds`.
    """

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
            Source(self.path).fail("profiles", name, "no such profile", f"use one of: {', '.join(self.profiles)}")
        return self.profiles[name]

    def row(self, name: str, profile: str = "published") -> Row:
        """The row ``name`` in ``profile``; ConfigError naming the known rows otherwise."""
        rows = self.profile(profile).rows
        found = next((row for row in rows if row.name == name), None)
        if found is None:
            Source(self.path).fail(
                "rows", name, f"no such row in {self.name}", f"use one of: {', '.join(r.name for r in rows)}"
            )
        return found


#: The command-line flag that sets each field of :class:`Overrides` (a row's or its settings' key of the same
#: name): the one place a config key meets its flag, so a mistake in a value the user typed names what was typed.
FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "batch": "--batch-size",
        "chunks": "--chunks",
        "balance": "--balance",
        "checkpoint": "--checkpoint",
        "epochs": "--epochs",
        "skip_epochs": "--skip-epochs",
        "precision": "--precision",
    }
)


@dataclass(frozen=True)
class Overrides:
    """Command-line overrides of a row and its settings; None keeps the config's value.

    ``flags``: where a field was not given by its :data:`FLAGS` flag, what gave it: another
    flag (``plan --batch``), or "" for a value the harness chose (a plan's chunks, an
    anchor's batch), which errors name by its config key.
    """

    batch: Optional[int] = None
    chunks: Optional[int] = None
    balance: Optional[Tuple[int, ...]] = None
    checkpoint: Optional[str] = None
    epochs: Optional[int] = None
    skip_epochs: Optional[int] = None
    precision: Optional[str] = None
    flags: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def given(self) -> Dict[str, Any]:
        """The fields given (not None), by name."""
        return {name: getattr(self, name) for name in FLAGS if getattr(self, name) is not None}

    def flag(self, name: str) -> str:
        """The flag that gives field ``name`` ("" if none does)."""
        return self.flags.get(name, FLAGS[name])
