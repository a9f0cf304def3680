"""From what the user asked for to resolved jobs: which rows, with which overrides, on which devices.

A :class:`Job` is one row of one table, resolved: its settings after
overrides, the profile, the devices of its partitions and the engine. Every
decision the command line used to make on its own (the default profile, the
row a flag names, the devices of a predict-only row, whether a launch can run
a row) is made here, before anything runs, so a bad choice is one
:class:`~gpipe_bench.errors.HarnessError` and no results file.

The rules that tie a row to its execution live here once:

- :func:`partitions`: how many partitions a row has: its balance's length;
  without a balance, a pipeline row's device count (a memory table lets
  ``balance_by_size`` find one), else one.
- :attr:`Job.split`: a row runs the split model (the engine's partitions)
  when it pipelines or has several partitions; ``naive-N`` is the model split
  over ``N`` devices without micro-batches, in every table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import config, devices, models, precision
from .config import Overrides, Row, Settings, Table
from .errors import HarnessError

__all__ = [
    "model_uses",
    "Job",
    "partitions",
    "table_for",
    "default_profile",
    "pick_rows",
    "resolve",
    "resolve_distributed",
    "resolve_accuracy",
    "check_precision",
    "check_engine_precision",
    "accuracy_placement",
    "Planner",
    "in_torchrun",
    "ENGINES",
    "SCHEDULES",
]

#: Engines a speed or memory row can run on (``--engine``).
ENGINES = ("gpipe-bench", "torchgpipe", "distributed")
#: torch.distributed.pipelining schedules (``--schedule``).
SCHEDULES = ("gpipe", "1f1b", "interleaved")


def partitions(row: Row) -> int:
    """How many partitions ``row`` runs: its balance's length, a pipeline row's devices without one, else 1."""
    if row.balance is not None:
        return len(row.balance)
    return row.devices if row.mode == "pipeline" else 1


@dataclass(frozen=True)
class Job:
    """One row to run, resolved: nothing is looked up later."""

    table: Table
    row: Row
    settings: Settings
    profile: str
    devices: Sequence[str]
    engine: str = "gpipe-bench"  # gpipe-bench | torchgpipe | distributed
    schedule: str = "gpipe"  # distributed only
    timeout_s: float = 300.0  # distributed only: the process group's timeout
    seeds: Sequence[int] = field(default_factory=lambda: (0,))  # accuracy only
    data: Optional[Path] = None  # accuracy only
    #: What the command line changed of the config's row (:func:`gpipe_bench.config.overridden`), and
    #: ``devices``: how many distinct devices its partitions shared, when they shared some. Its record
    #: carries them and takes a name of its own (:func:`gpipe_bench.results.path_for`).
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        """The registered model the profile trains (a profile may name a smaller one of the family)."""
        return self.table.profile(self.profile).model or self.table.model

    @property
    def model_args(self) -> Dict[str, Any]:
        profile = self.table.profile(self.profile)
        return {
            **self.table.model_args,
            **profile.model_args,
            **self.row.model_args,
            "num_classes": self.settings.classes,
        }

    @property
    def device_type(self) -> str:
        """``cuda`` or ``cpu``: where the row computes (autocast's device type); a launch's ranks: this host's."""
        first = self.devices[0] if self.devices else "cpu"
        if first.startswith("rank"):
            return "cuda" if torch.cuda.is_available() else "cpu"
        return "cuda" if first.startswith("cuda") else "cpu"

    @property
    def split(self) -> bool:
        """Whether the row runs the model split into partitions (see the module docstring)."""
        return self.row.mode == "pipeline" or partitions(self.row) > 1

    @property
    def record_engine(self) -> str:
        """The engine name a record carries: ``distributed-<schedule>`` for torch's pipelining."""
        return f"distributed-{self.schedule}" if self.engine == "distributed" else self.engine

    @property
    def memory_settings(self) -> config.MemorySettings:
        """A memory table's own settings (``settings.extra``, defaults applied); TypeError for another kind."""
        return config.MemorySettings.of(self.table, self.settings)

    @property
    def accuracy_settings(self) -> config.AccuracySettings:
        """An accuracy table's own settings (``settings.extra``, defaults applied); TypeError for another kind."""
        return config.AccuracySettings.of(self.table, self.settings)

    def steps_per_epoch(self) -> int:
        steps = self.settings.dataset_size // self.row.batch
        if steps < 1:
            raise HarnessError(
                f"dataset_size {self.settings.dataset_size} is smaller than the batch {self.row.batch}: "
                "no full step per epoch; raise dataset_size or lower --batch-size"
            )
        return steps

    def settings_record(self) -> Dict[str, Any]:
        """The settings a record carries: everything the figure depends on, as run."""
        row, s = self.row, self.settings
        return {
            "model": self.model_name,
            "model_args": self.model_args,
            "mode": row.mode,
            "devices": list(self.devices),
            "batch": row.batch,
            "chunks": row.chunks,
            "balance": list(row.balance) if row.balance else None,
            **({"balance_planned": True} if row.planned else {}),
            "checkpoint": row.checkpoint,
            "input_size": s.input_size,
            "dataset_size": s.dataset_size,
            "epochs": s.epochs,
            "skip_epochs": s.skip_epochs,
            "optimizer": dict(s.optimizer),
            "classes": s.classes,
            "precision": row.precision,
            **({"overrides": dict(self.overrides)} if self.overrides else {}),
        }


def check_precision(job: Job) -> Job:
    """``job`` if its devices and engine run its precision; else one error naming what does.

    Only a present GPU is asked whether it has bf16; a row sized for GPUs
    without running (predict-only) is taken to run on one that does.
    """
    bf16 = True
    if job.device_type == "cuda" and torch.cuda.is_available() and any(d.startswith("cuda") for d in job.devices):
        bf16 = torch.cuda.is_bf16_supported()
    precision.check(job.row.precision, job.device_type, bf16, where=job.row.name)
    return check_engine_precision(job)


def check_engine_precision(job: Job) -> Job:
    """``job`` if its engine runs its precision as asked; else one error saying why not and what does.

    The rules of the engines, whatever the devices (a prediction on a preset asks them too):
    torchgpipe 0.0.7's workers are threads that do not take the caller's autocast (a split
    row would run in fp32 unannounced); torch's pipelining stages would each need the one
    loss scale fp16 needs, which it does not keep.
    """
    autocast = precision.autocast_dtype(job.row.precision) is not None
    if job.engine == "torchgpipe" and job.split and autocast:
        raise HarnessError(
            f"{job.row.name}: torchgpipe 0.0.7's workers do not take the caller's autocast, so --precision "
            f"{job.row.precision} would run in fp32; use --engine gpipe-bench, or --precision fp32/tf32",
            param="--precision",
        )
    if job.engine == "distributed" and job.row.precision == "fp16":
        raise HarnessError(
            f"{job.row.name}: --precision fp16 needs one loss scale agreed by every stage, which --engine distributed "
            "does not keep; use --precision bf16 (no loss scale), or fp16 with --engine gpipe-bench",
            param="--precision",
        )
    return job


#: Chooses a planned row's balance for its devices: (the job with its balance, how it was chosen).
Planner = Callable[[Job], Tuple[Job, str]]


# -- choosing ------------------------------------------------------------------------------------------------------


def table_for(model: str, kind: str, plain: bool = False) -> Table:
    """The table ``<model>-<kind>``; a one-line error naming the models that have such a table.

    ``plain``: a registered model without a speed table gets its plain model's
    (:func:`gpipe_bench.config.plain_table`): what ``predict`` needs for any model.
    """
    name = f"{model}-{kind}"
    if name not in config.table_names():
        known = [t[: -len(f"-{kind}")] for t in config.table_names() if t.endswith(f"-{kind}")]
        if plain and kind == "speed":
            if model in models.names():
                return config.plain_table(model)
            raise HarnessError(
                f"no model {model!r}; choose a model with a speed table ({', '.join(known)}) or any registered "
                f"model ({', '.join(models.names())})",
                param="MODEL",
            )
        raise HarnessError(f"no {kind} table for {model!r}; choose one of: {', '.join(known)}", param="MODEL")
    return config.load(name)


def model_uses(model: str) -> str:
    """What a registered model is for, in a phrase for ``gpipe-bench list``: the commands that take it as MODEL.

    From :func:`table_for`'s rule: a model's own tables (``<model>-<kind>``) give it their
    commands (plan with a speed table), ``predict`` takes any model (its plain model where
    it has no speed table), and a profile may train it in place of its table's model.
    """
    tables = [config.load(name) for name in config.table_names()]
    kinds = [kind for kind in config.KINDS if any(t.kind == kind and t.model == model for t in tables)]
    commands = kinds + (["predict", "plan"] if "speed" in kinds else ["predict (its plain model, naive-1)"])
    trained = [f"{t.name} {p.name}" for t in tables for p in t.profiles.values() if p.model == model != t.model]
    return "for " + ", ".join(commands) + "".join(f"; the model the {where} profile trains" for where in trained)


def default_profile(profile: Optional[str], cuda: bool) -> Tuple[str, str]:
    """(profile, a note for the user or ""): the published sizes with CUDA, the quick ones without."""
    if profile is not None:
        return profile, ""
    if cuda:
        return "published", ""
    return "quick", (
        "No CUDA device: running the quick profile on virtual CPU devices "
        "(--profile published forces the published sizes)."
    )


def names_a_row(*, pipeline: Optional[int], naive: Optional[int], experiment: Optional[str]) -> bool:
    """Whether ``--pipeline/--naive/--experiment`` name a row; naming two is an error (before anything loads)."""
    named = [
        flag
        for flag, value in (("--pipeline", pipeline), ("--naive", naive), ("--experiment", experiment))
        if value is not None
    ]
    if len(named) > 1:
        raise HarnessError(f"{' and '.join(named)} both name a row; give one")
    return bool(named)


def pick_rows(
    table: Table,
    profile: str,
    *,
    pipeline: Optional[int] = None,
    naive: Optional[int] = None,
    experiment: Optional[str] = None,
) -> Tuple[List[Row], bool]:
    """(rows, whether the user named one): the row ``--pipeline/--naive/--experiment`` names, or every row."""
    if names_a_row(pipeline=pipeline, naive=naive, experiment=experiment):
        return [config.find_row(table, pipeline=pipeline, naive=naive, experiment=experiment, profile=profile)], True
    return list(table.profile(profile).rows), False


def _predict_only_devices(spec: Optional[str], count: int, profile: str) -> List[str]:
    """Devices a row is sized for without running: those given, else the published machine's or virtual CPUs."""
    if spec:
        given = devices.parse(spec)[:count]
        if len(given) < count:
            raise HarnessError(f"{len(given)} device(s) given for {count} partitions; give {count}", param="--devices")
        return given
    return [f"cuda:{j}" for j in range(count)] if profile == "published" else [f"cpu:{j}" for j in range(count)]


def resolve(
    table: Table,
    profile: str,
    rows: Sequence[Row],
    overrides: Overrides,
    devices_spec: Optional[str],
    *,
    engine: str = "gpipe-bench",
    predict_only: bool = False,
    planner: Optional["Planner"] = None,
) -> List[Tuple[Job, str]]:
    """(job, a note about its devices or "") per row, every row resolved and validated before any runs.

    ``planner`` chooses the balance of a ``balance: planned`` row once its devices
    are known (the command line passes :func:`gpipe_bench.predict.plan.resolve_planned`):
    resolving a row is below the planner, which itself resolves rows.
    """
    chosen = table.profile(profile)
    jobs = []
    for config_row in rows:
        row, settings = config.apply(table, config_row, chosen.settings, overrides, model=chosen.model)
        changed = config.overridden(table.kind, (config_row, chosen.settings), (row, settings))
        count = partitions(row)
        if predict_only:
            placed = _predict_only_devices(devices_spec, count, profile)
            sized = Job(table, row, settings, profile, placed, engine, overrides=changed | _shared(placed))
            jobs.append((check_precision(sized), ""))
            continue
        placement = devices.resolve(devices_spec, count)
        changed |= _shared(placement.devices)
        job = check_precision(Job(table, row, settings, profile, placement.devices, engine, overrides=changed))
        note = placement.note
        if row.planned and row.balance is None:
            if planner is None:
                raise ValueError(f"{row.name}: its balance is planned and resolve() was given no planner")
            job, how = planner(job)
            note = "; ".join(n for n in (note, f"balance {list(job.row.balance or ())} {how}") if n)
        jobs.append((job, note))
    return jobs


def _shared(placed: Sequence[str]) -> Dict[str, int]:
    """``{"devices": N}`` when the partitions share N < their count distinct devices (not the row's devices)."""
    distinct = len(set(placed))
    return {"devices": distinct} if distinct < len(placed) else {}


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_distributed(
    table: Table,
    profile: str,
    rows: Sequence[Row],
    overrides: Overrides,
    *,
    named: bool,
    schedule: str,
    timeout_s: float,
) -> Tuple[List[Job], List[str]]:
    """(jobs, notes) of the rows this launch can run: their stage count fits the processes and the schedule.

    A named row that cannot run is an error; of the whole table, the rows that
    cannot are left out (1F1B rows with too few micro-batches get a note).
    """
    from .distributed import schedule as dschedule

    if not in_torchrun():
        raise HarnessError(
            "--engine distributed runs one process per stage (several with --schedule interleaved): start it with "
            "`gpipe-bench launch --nproc N -- ...` or `torchrun --nproc-per-node N -m gpipe_bench.cli ...`"
        )
    size = int(os.environ["WORLD_SIZE"])
    chosen = table.profile(profile)
    jobs, notes = [], []
    for config_row in rows:
        row, settings = config.apply(table, config_row, chosen.settings, overrides, model=chosen.model)
        changed = config.overridden(table.kind, (config_row, chosen.settings), (row, settings))
        stages = partitions(row)
        if row.planned and row.balance is None:
            # Every rank would time the layers on its own and might plan another balance: the ranks must agree.
            if named:
                raise HarnessError(
                    f"{row.name}: a planned balance is not planned inside a launch (each rank would time its own); "
                    f"plan it with `gpipe-bench plan {table.model} --engine distributed --devices ...` and pass "
                    "--balance",
                    param="--balance",
                )
            notes.append(f"{row.name}: skipped: its balance is planned (run it with --balance from gpipe-bench plan)")
            continue
        if row.batch % row.chunks:
            raise HarnessError(
                f"{row.name}: batch {row.batch} is not divisible by chunks {row.chunks} (torch's "
                "pipelining needs equal micro-batches); give --batch-size or --chunks that divide",
                param="--chunks",
            )
        problem = dschedule.check(schedule, stages, size, row.chunks)
        if problem is not None:
            if named:
                raise HarnessError(f"{row.name}: {problem}")
            if schedule == "1f1b" and stages == size:
                notes.append(
                    f"{row.name}: skipped: {row.chunks} micro-batch(es) for {stages} stages, fewer than 1f1b "
                    "needs (with one micro-batch every schedule is fill-drain: --schedule gpipe runs it)"
                )
            continue
        jobs.append(
            check_precision(
                Job(
                    table,
                    row,
                    settings,
                    profile,
                    [f"rank{r}" for r in range(size)],
                    "distributed",
                    schedule,
                    timeout_s,
                    overrides=changed,
                )
            )
        )
    if not jobs:
        wanted = (
            f"{size} stage(s)" if schedule != "interleaved" else f"a multiple of {size} stages, at least {2 * size}"
        )
        raise HarnessError(
            f"no row of {table.name} ({profile}) has {wanted}; rows: "
            + ", ".join(f"{r.name} ({partitions(r)})" for r in chosen.rows)
        )
    return jobs, notes


def resolve_accuracy(
    table: Table,
    profile: str,
    *,
    experiment: Optional[str],
    epochs: Optional[int],
    seeds: Optional[int],
    data: Optional[Path],
    cuda: bool,
    precision: Optional[str] = None,
) -> List[Job]:
    """The accuracy rows to train, resolved; a missing or malformed dataset is one error before anything runs.

    Data-parallel rows: one process per replica (a GPU each with CUDA). Pipeline
    rows: a device per partition with CUDA; on a CPU every partition shares one
    worker: what a row learns does not depend on where its partitions run (the
    same micro-batches, checkpoints and BatchNorm), and one worker trains
    1.5-2x faster than virtual devices competing for the same cores.
    """
    from .data import fashion_mnist, imagenet

    chosen = table.profile(profile)
    rows = [table.row(experiment, profile)] if experiment else list(chosen.rows)
    recipe = config.AccuracySettings.of(table, chosen.settings)
    if recipe.dataset == "imagenet":
        if data is None:
            raise HarnessError(
                f"the {profile} profile trains on ImageNet: give PATH with train/ and val/ class "
                "folders (or use --profile quick, Fashion-MNIST)",
                param="--data",
            )
        imagenet.check_layout(data)
    else:
        fashion_mnist.locate(data)
    count = seeds if seeds is not None else recipe.runs
    jobs = []
    for config_row in rows:
        row, settings = config.apply(
            table, config_row, chosen.settings, Overrides(epochs=epochs, precision=precision), model=chosen.model
        )
        changed = config.overridden(table.kind, (config_row, chosen.settings), (row, settings))
        width = row.devices if row.mode == "dataparallel" else partitions(row)
        if cuda:
            placed = devices.resolve(None, width).devices
        else:
            placed = ["cpu"] * width
        job = Job(
            table,
            row,
            settings,
            profile,
            placed,
            seeds=tuple(range(count)),
            data=data,
            timeout_s=3600.0,
            overrides=changed,
        )
        jobs.append(check_precision(job))
    return jobs


def accuracy_placement(job: Job, cuda: bool) -> str:
    """Where an accuracy row's work runs, in words."""
    if job.row.mode == "dataparallel":
        return "processes"
    return "devices" if cuda else "partitions on one CPU worker"
