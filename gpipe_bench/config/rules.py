"""The rules that tie a table's values together, checked at load time and again after overrides.

Types and allowed keys are :mod:`gpipe_bench.config.layout`'s business; these
are the checks that need several values at once (a row's chunks against its
batch, a balance against the model's length), kept in one place so
:func:`~gpipe_bench.config.loader.load` and :func:`~gpipe_bench.config.rows.apply`
cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

from gpipe_bench import models

from .layout import PLANNED
from .schema import ConfigError, Source, join
from .types import Row, Settings

__all__ = ["check_row", "check_settings", "model_length"]

#: Layers per (model, arguments): building a model on meta takes long enough to do it once per process.
_LENGTHS: Dict[Tuple[str, str], Optional[int]] = {}


def model_length(src: Source, key: str, model: str, args: Mapping[str, Any], classes: int) -> Optional[int]:
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


def check_settings(src: Source, key: str, s: Settings) -> None:
    """At least one epoch is measured after the skipped ones.

    Where only the epochs came from a flag (``--epochs 1`` against the table's one warm-up
    epoch), the flag is what the user can see and change, so it is the one named.
    """
    if s.skip_epochs < s.epochs:
        return
    skip, epochs = join(key, "skip_epochs"), join(key, "epochs")
    fix = f"use {src.at_most(skip, s.epochs - 1)}, or {src.at_least(epochs, s.skip_epochs + 1)}"
    if src.from_flag(epochs) and not src.from_flag(skip):
        src.fail(
            epochs,
            s.epochs,
            f"not more than the warm-up epochs left out (skip_epochs {s.skip_epochs}): nothing would be measured",
            fix,
        )
    src.fail(skip, s.skip_epochs, f"not less than epochs ({s.epochs}): nothing would be measured", fix)


def check_row(src: Source, key: str, table: Mapping[str, Any], row: Row, settings: Settings) -> None:
    """The rules that tie a row's values together (types are already checked).

    ``table``: the table's ``model`` (the profile's, where it trains a smaller one) and ``kind``.
    """

    def k(field: str) -> str:  # k("chunks") -> "rows.pipeline-8.chunks"
        return f"{key}.{field}"

    def leave_out(field: str, instead: str) -> str:  # how to undo a value: drop the flag, or write another
        flag = src.flags.get(k(field))
        return f"leave {flag} out" if src.from_flag(k(field)) and flag else instead

    if row.mode != "pipeline" and row.chunks != 1:
        src.fail(
            k("chunks"),
            row.chunks,
            f"{row.mode} rows have no micro-batches",
            leave_out("chunks", "set chunks: 1") + " (micro-batching is what pipeline rows do)",
        )
    if row.mode != "pipeline" and row.checkpoint != "never":
        src.fail(
            k("checkpoint"),
            row.checkpoint,
            f"{row.mode} rows run the plain model",
            leave_out("checkpoint", "set checkpoint: never") + " (pipeline rows checkpoint)",
        )
    if row.chunks > row.batch:
        if src.from_flag(k("batch")) and not src.from_flag(k("chunks")):
            src.fail(
                k("batch"),
                row.batch,
                f"fewer samples than the row's {row.chunks} micro-batches (chunks)",
                f"use {src.at_least(k('batch'), row.chunks)}, or {src.at_most(k('chunks'), row.batch)}",
            )
        src.fail(
            k("chunks"),
            row.chunks,
            f"more micro-batches than samples in the batch ({row.batch})",
            f"use {src.at_most(k('chunks'), row.batch)}",
        )
    if row.batch > settings.dataset_size:
        src.fail(
            k("batch"),
            row.batch,
            f"larger than dataset_size ({settings.dataset_size}): an epoch has no step",
            f"use {src.at_most(k('batch'), settings.dataset_size)}"
            + ("" if src.from_flag(k("batch")) else " or a larger settings.dataset_size"),
        )
    length = model_length(src, k("model_args"), table["model"], row.model_args, settings.classes)
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
        src.fail(
            k("balance"),
            row.balance,
            "data-parallel rows replicate the whole model",
            leave_out("balance", "remove the balance (null)"),
        )
    if len(row.balance) != row.devices:
        src.fail(
            k("balance"),
            row.balance,
            f"{len(row.balance)} partitions for {row.devices} devices",
            f"give {row.devices} entries"
            + ("" if src.from_flag(k("balance")) else f", or devices: {len(row.balance)}"),
        )
    if length is not None and sum(row.balance) != length:
        args = ", ".join(f"{a}={v}" for a, v in row.model_args.items())
        src.fail(
            k("balance"),
            row.balance,
            f"sums to {sum(row.balance)} but {table['model']}({args}) has {length} layers",
            f"make the entries sum to {length}",
        )
