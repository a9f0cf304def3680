"""Each table kind's own settings (``settings.extra``): a typed, frozen dataclass beside the schema that checks it.

Why one class per kind: a speed, memory or accuracy run reads its settings
as attributes with their types (``job.memory_settings.parameter_copies``),
so a missing default or a misspelt key is a load-time error, not a KeyError
in the middle of a run. Each class's fields are exactly the keys its
``SCHEMA`` allows, and their defaults are what a key left out means (the one
home of those defaults). Keys that describe what the harness does
(``data: fixed-batch``, ``find_balance: balance_by_size``) are checked too: a
config cannot claim a method the harness does not implement.

``Settings.extra`` keeps the mapping as written, for the records that print it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Literal, Mapping, Optional, Tuple, Type, TypeVar

from .schema import (
    ABSENT,
    Checker,
    Source,
    at_least_zero,
    check_fields,
    choice,
    epochs_at,
    fixed,
    flag,
    integer,
    mapping,
    number,
    show,
    typed,
)
from .types import Kind, Settings, Table

__all__ = [
    "KIND_SETTINGS",
    "TRANSFORMS",
    "AccuracySettings",
    "KindSettings",
    "MemorySettings",
    "SpeedSettings",
    "check_extra",
]

S = TypeVar("S", bound="KindSettings")


class KindSettings:
    """What every kind's settings share: built from ``settings.extra``, checked against ``SCHEMA``.

    A key left out takes the dataclass field's default.
    """

    #: The table kind these settings belong to.
    KIND: ClassVar[Kind]
    #: The keys ``settings.extra`` may hold for this kind, in the order an error lists them, and their checkers.
    SCHEMA: ClassVar[Mapping[str, Checker]]

    @classmethod
    def parse(cls: Type[S], src: Source, key: str, extra: Mapping[str, Any]) -> S:
        """``extra`` checked (a ConfigError line naming ``src`` and ``key`` otherwise), defaults applied."""
        values = check_fields(src, key, dict(extra), {name: (check, ABSENT) for name, check in cls.SCHEMA.items()})
        cls._check_together(src, key, values)
        return cls(**values)

    @classmethod
    def _check_together(cls, src: Source, key: str, values: Mapping[str, Any]) -> None:
        """Rules that need several values at once; a kind with such rules overrides this."""

    @classmethod
    def from_extra(cls: Type[S], extra: Mapping[str, Any], path: str) -> S:
        """``extra`` (``settings.extra`` of the table file at ``path``) as this kind's settings."""
        return cls.parse(Source(path), "settings.extra", extra)

    @classmethod
    def of(cls: Type[S], table: Table, settings: Settings) -> S:
        """``settings.extra`` of ``table`` as this kind's settings; asking a table of another kind is a bug."""
        if table.kind != cls.KIND:
            raise TypeError(f"{table.name} is a {table.kind} table: only {cls.KIND} tables have {cls.__name__}")
        return cls.from_extra(settings.extra, table.path)


_SPEED: Dict[str, Checker] = {"data": fixed("fixed-batch")}


@dataclass(frozen=True)
class SpeedSettings(KindSettings):
    """``settings.extra`` of a speed table."""

    KIND: ClassVar[Kind] = "speed"
    SCHEMA: ClassVar[Mapping[str, Checker]] = _SPEED

    #: Every step trains the same batch (the published method; no data loading is timed).
    data: Literal["fixed-batch"] = "fixed-batch"


_MEMORY: Dict[str, Checker] = {
    "steps": integer(1),
    "bytes_per_parameter": integer(1),
    "parameter_copies": integer(1),
    "find_balance": fixed("balance_by_size"),
}


@dataclass(frozen=True)
class MemorySettings(KindSettings):
    """``settings.extra`` of a memory table."""

    KIND: ClassVar[Kind] = "memory"
    SCHEMA: ClassVar[Mapping[str, Checker]] = _MEMORY

    #: Training steps the peak is taken over.
    steps: int = 2
    #: Bytes of one parameter (float32): the published model-memory rule's width.
    bytes_per_parameter: int = 4
    #: Copies of the parameters held (weights, gradients, one optimizer buffer): the rule's other factor.
    parameter_copies: int = 3
    #: How a row without a balance is split: balance_by_size on meta.
    find_balance: Literal["balance_by_size"] = "balance_by_size"


#: The augmentations the harness implements per dataset (measure/accuracy.py, data/), the default first:
#: a config that names others is wrong. Fashion-MNIST may leave out the random crop (short runs converge
#: faster without it).
TRANSFORMS: Dict[str, Dict[str, List[List[str]]]] = {
    "imagenet": {
        "train_transforms": [["random_resized_crop", "horizontal_flip", "normalize"]],
        "val_transforms": [["resize", "center_crop", "normalize"]],
    },
    "fashion-mnist": {
        "train_transforms": [["random_crop", "horizontal_flip", "normalize"], ["horizontal_flip", "normalize"]],
        "val_transforms": [["normalize"]],
    },
}

_ACCURACY: Dict[str, Checker] = {
    "dataset": choice("fashion-mnist", "imagenet"),
    "val_size": integer(1),
    "val_resize": integer(1),
    "lr_scale_batch": integer(1),
    "warmup_epochs": at_least_zero,
    "warmup_step": fixed("iteration"),
    "lr_milestones": epochs_at,
    "lr_gamma": number,
    "normalize": mapping,
    "deferred_batch_norm": flag,
    "memory_format": choice("contiguous", "channels_last"),
    "runs": integer(1),
    "train_transforms": typed(list, "not a list", "write e.g. [random_crop, horizontal_flip, normalize]"),
    "val_transforms": typed(list, "not a list", "write e.g. [normalize]"),
    "error": fixed("100 x (1 - accuracy) on the validation set"),
    "reference": mapping,  # the source's own reference figure, for readers of the config
}


@dataclass(frozen=True)
class AccuracySettings(KindSettings):
    """``settings.extra`` of an accuracy table: the training recipe beside the optimizer."""

    KIND: ClassVar[Kind] = "accuracy"
    SCHEMA: ClassVar[Mapping[str, Checker]] = _ACCURACY

    dataset: Literal["fashion-mnist", "imagenet"] = "fashion-mnist"
    #: Validation images (Fashion-MNIST: the first of its test set).
    val_size: int = 1000
    #: ImageNet: the shorter side validation images are resized to before the centre crop.
    val_resize: int = 256
    #: The learning rate is lr x batch / lr_scale_batch.
    lr_scale_batch: int = 256
    #: Linear warm-up, in epochs (fractions allowed), stepped per iteration.
    warmup_epochs: float = 0.0
    warmup_step: Literal["iteration"] = "iteration"
    #: Epochs (fractions allowed) at which the learning rate is multiplied by lr_gamma.
    lr_milestones: Tuple[float, ...] = ()
    lr_gamma: float = 0.1
    #: Per-channel ``mean`` and ``std``; None: the dataset's own (its data module holds them).
    normalize: Optional[Mapping[str, Any]] = None
    #: Pipeline rows: BatchNorm statistics over the whole mini-batch instead of per micro-batch.
    deferred_batch_norm: bool = False
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    #: Seeds trained per row.
    runs: int = 3
    #: Augmentations of a training / validation image; empty: the dataset's default (:data:`TRANSFORMS`).
    train_transforms: Tuple[str, ...] = ()
    val_transforms: Tuple[str, ...] = ()
    error: Literal["100 x (1 - accuracy) on the validation set"] = "100 x (1 - accuracy) on the validation set"
    #: The source's own reference figure, for readers of the config.
    reference: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        defaults = TRANSFORMS[self.dataset]
        for name in ("train_transforms", "val_transforms"):
            given = getattr(self, name)
            object.__setattr__(self, name, tuple(given) if given else tuple(defaults[name][0]))

    @classmethod
    def _check_together(cls, src: Source, key: str, values: Mapping[str, Any]) -> None:
        """The augmentations named are ones the harness applies for the dataset."""
        implemented = TRANSFORMS[str(values.get("dataset", cls.dataset))]
        for name, allowed in implemented.items():
            if name in values and values[name] not in allowed:
                src.fail(
                    f"{key}.{name}",
                    values[name],
                    "not an augmentation the harness applies for this dataset",
                    "write " + " or ".join(show(a) for a in allowed),
                )


#: Each kind's settings class.
KIND_SETTINGS: Dict[str, Type[KindSettings]] = {
    cls.KIND: cls for cls in (SpeedSettings, MemorySettings, AccuracySettings)
}


def check_extra(src: Source, key: str, kind: str, extra: Mapping[str, Any]) -> KindSettings:
    """Every ``settings.extra`` key is one the harness reads, with a value it implements (a ``kind`` table's)."""
    return KIND_SETTINGS[kind].parse(src, key, extra)
