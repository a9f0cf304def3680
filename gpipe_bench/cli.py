"""The ``gpipe-bench`` command line: click only; parse, call the harness, print.

Decisions live in the harness (:mod:`gpipe_bench.jobs` resolves what to run,
:mod:`gpipe_bench.measure` runs it, :mod:`gpipe_bench.report` renders it);
this module holds the options (shared ones once, as decorators), the
progress display and the lines a user reads. Every mistake a user can make
is a :class:`~gpipe_bench.errors.HarnessError`, shown as one line naming the
bad value and the fix, exit code 2, and no results file.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple, TypeVar, Union

import click
import torch

from . import __version__, config, jobs, models, report, results, signals
from .config import Overrides
from .errors import HarnessError
from .precision import DEFAULT as DEFAULT_PRECISION
from .precision import PRECISIONS
from .timeline import files as timeline
from .timeline.model import Timeline

if TYPE_CHECKING:
    from .predict.hardware import Hardware

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
F = TypeVar("F", bound=Callable[..., Any])


class _Command(click.Command):
    """A command whose HarnessError is shown as click shows a usage error (one line naming the fix; exit 2)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as stop:  # outside a row (resolving, planning, printing): nothing was being saved
            click.echo("\nInterrupted.", err=True)
            sys.exit(signals.exit_code(stop))
        except HarnessError as error:
            if error.param:
                raise click.BadParameter(error.message, ctx=ctx, param_hint=error.param) from None
            raise click.UsageError(error.message, ctx=ctx) from None


class _Group(click.Group):
    command_class = _Command


def _skipped(path: Path, reason: str) -> None:
    click.echo(f"warning: skipping {path}: not a gpipe-bench result ({reason})", err=True)


@click.group(cls=_Group, context_settings=_CONTEXT)
@click.version_option(__version__, prog_name="gpipe-bench")
def main() -> None:
    """Reproduce the published GPipe/torchgpipe tables on this machine.

    \b
    gpipe-bench list                              tables, rows and models
    gpipe-bench speed resnet101 --pipeline 8      one row of the ResNet-101 speed table
    gpipe-bench speed resnet101                   the whole table
    gpipe-bench memory amoebanetd --per-device    the memory table: measured and predicted
    gpipe-bench predict resnet101 --hardware p40  speed predicted without running (--hardware list)
    gpipe-bench accuracy resnet101                the accuracy table (quick: Fashion-MNIST)
    gpipe-bench table resnet101-speed             saved results in the published layout
    gpipe-bench compare --check                   ours vs published; exit 1 on a regression
    gpipe-bench launch --nproc 2 -- speed resnet101 --pipeline 2 --engine distributed
                                                  the same row on torch's pipelining, 2 processes

    The engine is importable as gpipe_bench.pipe (torchgpipe 0.0.7's API).
    """
    # SIGTERM stops a run as Ctrl-C does: the finished rows kept, one line, exit 143 (gpipe_bench.signals).
    click.get_current_context().call_on_close(signals.install())


# -- shared options ----------------------------------------------------------------------------------------------


def _options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


_row_options = _options(
    click.option("--pipeline", type=click.IntRange(min=1), help="Run the row pipeline-N."),
    click.option("--naive", type=click.IntRange(min=1), help="Run the row naive-N."),
    click.option("--experiment", help="Run the row with this exact name (e.g. pipeline-8)."),
    click.option(
        "--devices",
        "devices_spec",
        metavar="LIST",
        help="Devices, e.g. 0,1,2,3 or cuda:0*8 or cpu:0,cpu:1 [default: every CUDA device; virtual CPU "
        "devices without CUDA].",
    ),
    click.option(
        "--profile",
        type=click.Choice(["published", "quick"]),
        help="Row sizes [default: published with CUDA, quick without].",
    ),
)


def _override_options(balance_default: str) -> Callable[[F], F]:
    return _options(
        click.option("--batch-size", type=click.IntRange(min=1), help="Mini-batch size [default: the row's]."),
        click.option("--chunks", type=click.IntRange(min=1), help="Micro-batches per mini-batch [default: the row's]."),
        click.option("--balance", help=f"Layers per partition{balance_default}."),
        click.option(
            "--checkpoint",
            type=click.Choice(["always", "except_last", "never"]),
            help="Checkpoint mode [default: the row's].",
        ),
    )


_precision_option = click.option(
    "--precision",
    type=click.Choice(list(PRECISIONS)),
    help="fp32: PyTorch's defaults (on Ampere and later GPUs those run convolutions in TF32 and matrix products in "
    "fp32); tf32: TF32 convolutions and matrix products (GPUs only); bf16 or fp16: autocast, parameters and "
    "optimizer in fp32 (a CPU takes bf16 only); fp16 also scales the loss and counts the steps it skips. Saved "
    "apart from the row's fp32 record [default: the row's, fp32 in every shipped table].",
)


class _Renamed(click.Option):
    """An option whose later names are old spellings: they keep working, and --help shows the first name only."""

    def get_help_record(self, ctx: click.Context) -> Optional[Tuple[str, str]]:
        spellings = self.opts
        self.opts = spellings[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = spellings


def _results_option(dest: str) -> Callable[[F], F]:
    """--results DIR on every command that writes or reads records (--output, its old name on the measuring
    commands, still works)."""
    return click.option(
        "--results",
        "--output",
        dest,
        cls=_Renamed,
        metavar="DIR",
        type=click.Path(file_okay=False, path_type=Path),
        help="Results directory, where records are written and read [default: $GPIPE_BENCH_RESULTS, else results/ "
        "of the working directory].",
    )


def _set_allocator(ctx: click.Context, param: click.Parameter, value: str) -> str:
    # Set while the options are parsed, before anything allocates, for every row of the command alike.
    from . import hostalloc

    hostalloc.apply(value)
    return value


_malloc_option = click.option(
    "--malloc",
    type=click.Choice(["steady", "default"]),
    default="steady",
    show_default=True,
    expose_value=False,
    is_eager=True,
    callback=_set_allocator,
    help="Host allocator: steady keeps freed memory in the process (glibc's thresholds fixed) so steps do not "
    "page-fault their memory back in; default leaves glibc as it is. Recorded with each result.",
)


def _cost_options(
    measured_help: str, engine_help: str, engines: Tuple[str, ...] = ("gpipe-bench", "distributed")
) -> Callable[[F], F]:
    """Where per-layer costs come from (predict, plan), and which engine is modelled."""
    return _options(
        click.option(
            "--hardware",
            metavar="NAME",
            help="A hardware preset; nothing runs (the model is counted on meta). "
            "`gpipe-bench predict --hardware list` shows the presets and their sources.",
        ),
        click.option(
            "--hardware-file",
            type=click.Path(path_type=Path),
            metavar="PATH",
            help="A preset of one's own instead of --hardware NAME: a YAML file with one preset's fields, as under "
            "`presets:` in gpipe_bench/predict/hardware.yaml (its `rates` name the packaged ones), checked alike.",
        ),
        click.option(
            "--costs",
            "cost_source",
            type=click.Choice(["measured"]),
            help=f"{measured_help} [the default without --hardware].",
        ),
        click.option(
            "--calibrate",
            metavar="ROW=THROUGHPUT",
            help="With --hardware: fit the preset's one efficiency factor so that the table's ROW is predicted at "
            "THROUGHPUT samples/s (e.g. naive-1=92.539); the output says what was fitted.",
        ),
        click.option(
            "--host-speed",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            help="With --hardware: the target host's speed per core against this machine's (2: twice as fast). The "
            "host's time per operator is measured here and divided by it; every prediction prints the assumption.",
        ),
        click.option(
            "--engine",
            type=click.Choice(list(engines)),
            default="gpipe-bench",
            show_default=True,
            help=engine_help,
        ),
    )


def _preset(name: Optional[str], file: Optional[Path], cost_source: Optional[str]) -> "Optional[Union[str, Hardware]]":
    """The preset --hardware NAME or --hardware-file PATH gives (a file's loaded and checked); None: measured costs."""
    from .predict.hardware import load_file

    if name is not None and file is not None:
        raise HarnessError("--hardware and --hardware-file both give a preset; give one", param="--hardware-file")
    chosen = load_file(file) if file is not None else name
    if chosen is not None and cost_source is not None:
        given = "--hardware" if name is not None else "--hardware-file"
        raise HarnessError(f"{given} and --costs measured are two cost sources; give one", param="--costs")
    return chosen


def _host_speed(speed: float, hardware: "Optional[Union[str, Hardware]]") -> float:
    """``--host-speed``, which only a preset's prediction uses (measured costs are this host's own)."""
    if speed != 1.0 and hardware is None:
        raise HarnessError(
            "--host-speed scales the host of a --hardware preset; measured costs are this machine's own "
            "(give --hardware NAME, or leave --host-speed out)",
            param="--host-speed",
        )
    return speed


def _distributed_options(schedule_help: str) -> Callable[[F], F]:
    return _options(
        click.option(
            "--schedule",
            type=click.Choice(list(jobs.SCHEDULES)),
            default="gpipe",
            show_default=True,
            help=schedule_help,
        ),
        click.option(
            "--timeout",
            "timeout_s",
            type=click.IntRange(min=1),
            default=300,
            show_default=True,
            help="--engine distributed: seconds a rank waits for a peer before it fails (the process group's timeout).",
        ),
    )


def _parse_balance(value: Optional[str]) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of integers, e.g. 26,22,33", param_hint="--balance"
        ) from None


def _rows(
    kind: str,
    model: str,
    profile: Optional[str],
    pipeline: Optional[int],
    naive: Optional[int],
    experiment: Optional[str],
    plain: bool = False,
) -> Tuple[config.Table, str, List[config.Row], bool, str]:
    """The table, profile and rows a speed or memory command names, and a note on the profile's default.

    The caller says the note once everything is resolved: an error comes alone, with no note before it.
    ``plain``: a registered model without a speed table gets its plain model's (``predict``).
    """
    jobs.names_a_row(pipeline=pipeline, naive=naive, experiment=experiment)
    table = jobs.table_for(model, kind, plain)
    profile_name, note = jobs.default_profile(profile, torch.cuda.is_available())
    rows, named = jobs.pick_rows(table, profile_name, pipeline=pipeline, naive=naive, experiment=experiment)
    return table, profile_name, rows, named, note


def _note(note: str, quiet: bool) -> None:
    if note and not quiet:
        click.echo(note, err=True)


# -- progress ------------------------------------------------------------------------------------------------------


class _Bar:
    """A progress bar per row with live samples/s; plain per-epoch lines with --quiet or when stderr is no terminal.

    Lines, not the bar, in a log: click draws a bar only on a terminal, and elsewhere prints
    its label alone ("       naive-1"), which reads as nothing in a CI log or a file.
    """

    def __init__(self, row: str, epochs: int, quiet: bool) -> None:
        self.row, self.epochs = row, epochs
        self.quiet = quiet or not sys.stderr.isatty()
        self.bar: Any = None
        self.rate = 0.0

    def __call__(self, epoch: int, step: int, steps: int, rate: float) -> None:
        self.rate = rate
        if self.quiet:
            if step == steps:
                click.echo(f"{self.row}: epoch {epoch + 1}/{self.epochs} {rate:.3f} samples/s", err=True)
            return
        if self.bar is None:
            self.bar = click.progressbar(
                length=self.epochs * steps,
                label=f"{self.row:>14s}",
                file=sys.stderr,
                show_eta=True,
                item_show_func=lambda _: f"{self.rate:9.2f} samples/s",
            )
            self.bar.__enter__()
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _show_saved(table: config.Table, root: Path, profile: str, done: List[results.Result]) -> List[results.Result]:
    """Print the table of every saved result on the hardware of the rows just run; those results (none if none ran)."""
    if not done:
        return []
    saved = results.load_all(root, table=table.name, profile=profile, hardware=done[0].hardware_key(), on_skip=_skipped)
    click.echo(report.render(table, saved, fmt="rst", published=True))
    return saved


def _write_plot(
    kind: str, table: config.Table, saved: List[results.Result], root: Path, done: List[results.Result]
) -> None:
    """``plot.<kind>_plot`` of the saved records of the rows' machine and precision, beside those records.

    One figure per precision (``memory-per-device--bf16.png``): a bf16 row is never drawn as its fp32 row.
    A line says why not when matplotlib is missing.
    """
    first = done[0]
    name = {"memory": "memory-per-device", "accuracy": "error-per-epoch"}[kind]
    suffix = "" if first.precision == DEFAULT_PRECISION else f"--{first.precision}"
    path = root / table.name / first.profile / first.hardware_key() / f"{name}{suffix}.png"
    saved = [r for r in saved if r.precision == first.precision]
    try:
        from . import plot

        draw: Callable[[config.Table, List[results.Result], Path], Path] = getattr(plot, f"{kind}_plot")
        written = draw(table, saved, path)
    except ImportError as missing:
        click.echo(f"No plot: {missing}", err=True)
        return
    click.echo(f"Plot: {written}", err=True)


def _interrupted(interrupt: Any, what: str) -> None:
    """The one line a stopped run prints (a launch's ranks leave it to the launch), and its exit code."""
    from .distributed.launch import ERROR_DIR_ENV

    if not os.environ.get(ERROR_DIR_ENV):
        by = "" if interrupt.signum == signal.SIGINT else f" (by {signal.Signals(interrupt.signum).name})"
        click.echo(f"\nInterrupted in {interrupt.job.row.name}{by}{what}", err=True)
    sys.exit(signals.exit_code(interrupt))


def _processes(size: int) -> str:
    return f"{size} process" + ("es" if size != 1 else "")


# -- list ----------------------------------------------------------------------------------------------------------


@main.command("list", context_settings=_CONTEXT)
def list_command() -> None:
    """Tables with their rows, and models with their layers and parameters.

    Example: gpipe-bench list
    """
    click.echo("Tables (gpipe_bench/configs/*.yaml):")
    for name in config.table_names():
        table = config.load(name)
        rows = ", ".join(r.name for r in table.profile("published").rows)
        click.echo(f"  {name:22s} {table.title}: {rows}")
    click.echo("\nModels (what each is for: the commands that take it as MODEL):")
    for name in models.names():
        click.echo(f"  {models.describe(name)}\n      {jobs.model_uses(name)}")


# -- speed ---------------------------------------------------------------------------------------------------------


@main.command("speed", context_settings=_CONTEXT)
@click.argument("model")
@_malloc_option
@_row_options
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs, warm-up included [default: the config's].")
@click.option(
    "--skip-epochs", type=click.IntRange(min=0), help="Warm-up epochs left out of the mean [default: the config's]."
)
@_override_options(", e.g. 26,22,33,44,44,66,66,69 [default: the row's]")
@_precision_option
@_results_option("output")
@click.option(
    "--engine",
    type=click.Choice(list(jobs.ENGINES)),
    default="gpipe-bench",
    show_default=True,
    help="The engine to time: ours; torchgpipe, the archived peer; distributed, torch.distributed.pipelining "
    "with one process per stage (run under torchrun or gpipe-bench launch).",
)
@_distributed_options(
    "--engine distributed: fill-drain (as published), one-forward-one-backward, or interleaved 1F1B "
    "(several stages per process, dealt round-robin)."
)
@click.option(
    "--timeline",
    "timeline_path",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Also record one training step after the warm-up (outside the timed epochs) and write PATH.png (a lane "
    "per device, a bar per cell) and PATH.json (a Chrome trace: ui.perfetto.dev or chrome://tracing). Several "
    "rows: PATH-<row>.png and PATH-<row>.json each. Our engine only (--engine gpipe-bench); a row that does not "
    "split the model (naive-1) is the plain model's forward and backward on its device, on any engine.",
)
@click.option(
    "--quiet", is_flag=True, help="One line per epoch instead of a progress bar (what stderr gets when not a terminal)."
)
def speed_command(
    model: str,
    pipeline: Optional[int],
    naive: Optional[int],
    experiment: Optional[str],
    devices_spec: Optional[str],
    profile: Optional[str],
    epochs: Optional[int],
    skip_epochs: Optional[int],
    batch_size: Optional[int],
    chunks: Optional[int],
    balance: Optional[str],
    checkpoint: Optional[str],
    precision: Optional[str],
    output: Optional[Path],
    engine: str,
    schedule: str,
    timeout_s: int,
    timeline_path: Optional[Path],
    quiet: bool,
) -> None:
    """Measure training throughput of a row of MODEL's speed table, or of the whole table.

    The published method: a fixed synthetic batch, dataset_size // batch steps an epoch,
    warm-up epochs left out, the mean of the per-epoch samples/s (spread kept too).
    Each row is saved to the results directory; then the table prints beside the
    published one.

    Example: gpipe-bench speed resnet101 --pipeline 8 --devices 0,1,2,3,4,5,6,7
    """
    from .measure import speed
    from .measure.runner import RowInterrupted, run_rows

    table, profile_name, rows, named, profile_note = _rows("speed", model, profile, pipeline, naive, experiment)
    overrides = Overrides(
        batch=batch_size,
        chunks=chunks,
        balance=_parse_balance(balance),
        checkpoint=checkpoint,
        epochs=epochs,
        skip_epochs=skip_epochs,
        precision=precision,
    )
    root = output if output is not None else results.results_dir()

    def measure(job: jobs.Job) -> Optional[results.Result]:
        rank0 = _rank() == 0
        label = job.row.name if job.engine != "distributed" else f"{job.row.name} ({job.schedule})"
        bar = _Bar(label, job.settings.epochs, quiet or not rank0)
        written: List[str] = []  # said once the bar is done
        sink: Optional[Callable[[Timeline], None]] = None
        if timeline_path is not None:
            target = timeline_path if len(planned) == 1 else timeline.row_path(timeline_path, job.row.name)

            def sink(recorded: Timeline) -> None:
                png, trace = timeline.paths(target)
                try:
                    timeline.write(recorded, target)
                except ImportError as missing:
                    written.append(f"{job.row.name}: timeline of one step: {trace} (no PNG: {missing})")
                    return
                written.append(
                    f"{job.row.name}: timeline of one step: {png}, {trace} (open the JSON in ui.perfetto.dev)"
                )

        try:
            return speed.run(job, bar if rank0 else None, sink)
        finally:
            bar.close()
            for line in written:
                click.echo(line, err=True)

    def saved(job: jobs.Job, result: results.Result, path: Optional[Path]) -> None:
        figure = "Out of memory" if result.status == "oom" else f"{result.value:.3f} {result.unit}"
        click.echo(f"{_row_label(job)}: {figure}  -> {path}", err=True)

    if timeline_path is not None:
        speed.check_timeline(engine)
    if engine == "distributed":
        planned, notes = jobs.resolve_distributed(
            table, profile_name, rows, overrides, named=named, schedule=schedule, timeout_s=timeout_s
        )
        before: Optional[Callable[[jobs.Job], None]] = None
    else:
        if not quiet and overrides.balance is None:
            for row in rows:
                if row.planned:
                    click.echo(
                        f"{row.name}: planning its balance for the devices at hand (timing the layers)", err=True
                    )
        from .predict.plan import resolve_planned

        pairs = jobs.resolve(table, profile_name, rows, overrides, devices_spec, engine=engine, planner=resolve_planned)
        planned, notes = [job for job, _ in pairs], []
        row_notes = {id(job): note for job, note in pairs}

        def before(job: jobs.Job) -> None:
            if row_notes.get(id(job)) and not quiet:
                click.echo(f"{job.row.name}: {row_notes[id(job)]}", err=True)

    if timeline_path is not None:
        # Before any row runs: a row that cannot be recorded, or a path that cannot be written, costs nothing.
        speed.check_timeline(engine, planned)
        timeline.check_writable(timeline_path)
    if _rank() == 0:
        _note(profile_note, quiet)
        for note in notes:
            click.echo(note, err=True)
    try:
        done = run_rows(planned, measure, root, writer=_rank() == 0, before=before, after=saved)
    except RowInterrupted as interrupt:
        finished = interrupt.completed_epochs or 0
        _interrupted(
            interrupt,
            f" after {finished} of {interrupt.job.settings.epochs} epochs; nothing written for it"
            f" ({interrupt.saved} earlier row(s) saved).",
        )
        return
    _show_saved(table, root, profile_name, done)


def _rank() -> int:
    return int(os.environ.get("RANK", "0")) if jobs.in_torchrun() else 0


def _row_label(job: jobs.Job) -> str:
    """A row's name in the per-row lines; with torch's pipelining, its engine and process count too."""
    if job.engine != "distributed":
        return job.row.name
    return f"{job.row.name} ({job.record_engine}, {_processes(len(job.devices))})"


# -- launch --------------------------------------------------------------------------------------------------------


@main.command("launch", context_settings={**_CONTEXT, "ignore_unknown_options": True})
@click.option("--nproc", type=click.IntRange(min=1), required=True, help="Processes on this host (one per stage).")
@click.option("--nnodes", default="1", show_default=True, help="Hosts, as torchrun takes it (e.g. 2 or 1:4).")
@click.option("--rdzv-endpoint", help="host:port of the rendezvous, for several hosts (torchrun's --rdzv-endpoint).")
@click.option("--rdzv-id", default="gpipe-bench", show_default=True, help="Rendezvous id shared by all hosts.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def launch_command(
    nproc: int, nnodes: str, rdzv_endpoint: Optional[str], rdzv_id: str, command: Tuple[str, ...]
) -> None:
    """Run a gpipe-bench COMMAND under torchrun, one process per stage.

    When a rank raises, dies or waits on a peer past --timeout, every rank is
    stopped and the error of the rank that failed first is printed once; a
    row that did not finish writes no result. Ranks share this host's cores
    (OMP_NUM_THREADS, unless set).

    \b
    One host:   gpipe-bench launch --nproc 2 -- speed resnet101 --pipeline 2 --engine distributed
    Two hosts:  gpipe-bench launch --nnodes 2 --nproc 4 --rdzv-endpoint HOST:29500 -- speed amoebanetd --pipeline 8 --engine distributed
                (the same line on both hosts)
    """
    from .distributed.launch import launch, thread_count

    args = [f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if rdzv_endpoint:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    else:
        args += ["--standalone"]
    # torchrun would set one thread per rank (and say so); share this host's cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(thread_count(nproc)))
    args += ["-m", "gpipe_bench.cli", *command]
    sys.exit(launch(args, world=None if rdzv_endpoint else nproc))


# -- memory --------------------------------------------------------------------------------------------------------


@main.command("memory", context_settings=_CONTEXT)
@_malloc_option
@click.argument("model")
@_row_options
@_override_options(" [default: the row's, or found by balance_by_size]")
@_precision_option
@click.option(
    "--predict-only",
    is_flag=True,
    help="Predict from the meta device only; run nothing and save nothing (sizes rows this machine cannot hold).",
)
@click.option("--per-device", is_flag=True, help="Also print each device's model memory, measured and predicted peak.")
@click.option(
    "--allocator-era",
    type=click.Choice(["current", "1.3"]),
    default="current",
    show_default=True,
    help="What CUDA rows' predicted reserved memory follows: today's caching allocator (with "
    "PYTORCH_CUDA_ALLOC_CONF as set) and our engine's step, or PyTorch 1.3's (2019, the published table's era: "
    "the same allocator rules, autograd's gradient accumulation, zero_grad in place, no multi-tensor optimizer).",
)
@_results_option("output")
@click.option(
    "--engine",
    type=click.Choice(["gpipe-bench", "distributed"]),
    default="gpipe-bench",
    show_default=True,
    help="Ours, or torch.distributed.pipelining with one process per stage (under gpipe-bench launch or torchrun).",
)
@_distributed_options("--engine distributed: the schedule (interleaved: several stages per process).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def memory_command(
    model: str,
    pipeline: Optional[int],
    naive: Optional[int],
    experiment: Optional[str],
    devices_spec: Optional[str],
    profile: Optional[str],
    batch_size: Optional[int],
    chunks: Optional[int],
    balance: Optional[str],
    checkpoint: Optional[str],
    precision: Optional[str],
    predict_only: bool,
    per_device: bool,
    allocator_era: str,
    output: Optional[Path],
    engine: str,
    schedule: str,
    timeout_s: int,
    quiet: bool,
) -> None:
    """Measure and predict the memory of a row of MODEL's memory table, or of the whole table.

    Per row: parameters (counted on the meta device), model memory (parameters ×
    4 bytes × 3: weights, gradients, one optimizer buffer, in GiB), and peak
    activation memory summed over devices: measured over two training steps (CUDA:
    the allocator's peak reserved memory minus the model; CPU: the bytes tensors
    held, model state left out) and predicted from the meta device alone: on
    CUDA rows both what the caching allocator reserves (the published
    quantity, replayed through a model of the allocator) and what it allocates.
    Rows with a null balance get one from balance_by_size. Each row is saved to the
    results directory; then the table prints beside the published one, and a PNG
    of the per-device memory is written next to the results. With --predict-only
    the table prints and nothing is written: a prediction is not a measurement
    of this machine.

    Example: gpipe-bench memory amoebanetd --profile published --predict-only --per-device
    """
    from .measure import memory
    from .measure.runner import RowInterrupted, run_rows
    from .memory.reserved import allocator_for

    table, profile_name, rows, named, profile_note = _rows("memory", model, profile, pipeline, naive, experiment)
    overrides = Overrides(
        batch=batch_size, chunks=chunks, balance=_parse_balance(balance), checkpoint=checkpoint, precision=precision
    )
    root = output if output is not None else results.results_dir()
    distributed = engine == "distributed"
    if distributed:
        planned, notes = jobs.resolve_distributed(
            table, profile_name, rows, overrides, named=named, schedule=schedule, timeout_s=timeout_s
        )
    else:
        from .predict.plan import resolve_planned

        planned = [
            job
            for job, _ in jobs.resolve(
                table,
                profile_name,
                rows,
                overrides,
                devices_spec,
                engine=engine,
                predict_only=predict_only,
                planner=resolve_planned,
            )
        ]
        notes = []
    allocator = allocator_for(allocator_era, [d for job in planned for d in job.devices])
    if _rank() == 0:
        _note(profile_note, quiet)
        for note in notes:
            click.echo(note, err=True)

    def before(job: jobs.Job) -> None:
        if not quiet and not distributed:
            what = "predicting" if predict_only else "predicting and measuring"
            click.echo(f"{job.row.name}: {what} on {', '.join(job.devices)}...", err=True)

    def saved(job: jobs.Job, result: results.Result, path: Optional[Path]) -> None:
        extra = result.extra
        if distributed:
            per_rank = ", ".join(report.format_gib(v) for v in extra["measured_per_device_gib"])
            click.echo(
                f"{_row_label(job)}: {report.format_gib(result.value)} (per rank: {per_rank})  -> {path}", err=True
            )
            return
        if result.status == "oom":
            figure = "Out of memory" + (f" ({extra['note']})" if extra.get("note") else "")
        elif result.value is None:
            figure = "not measured"
        else:
            figure = f"{report.format_gib(result.value)} measured"
            if extra.get("allocated_gib") is not None:  # CUDA: what the prediction is compared with
                figure += f" ({report.format_gib(extra['allocated_gib'])} allocated)"
        predicted = f"{report.format_gib(extra['predicted_gib'])} predicted"
        if extra.get("predicted_reserved_gib") is not None:
            predicted = (
                f"{report.format_gib(extra['predicted_reserved_gib'])} predicted reserved "
                f"({report.format_gib(extra['predicted_allocated_gib'])} allocated)"
            )
        where = f"  -> {path}" if path is not None else " (not saved: a prediction, not a measurement)"
        click.echo(f"{job.row.name}: {figure}, {predicted}{where}", err=True)

    try:
        done = run_rows(
            planned,
            lambda job: memory.run(job, predict_only=predict_only, allocator=allocator),
            None if predict_only else root,
            writer=_rank() == 0,
            before=before,
            after=saved,
        )
    except RowInterrupted as interrupt:
        _interrupted(interrupt, f"; nothing written for it ({interrupt.saved} earlier row(s) saved).")
        return
    if predict_only:  # sized for devices this host may lack: shown, never saved among this host's measurements
        click.echo(report.render(table, done, fmt="rst", published=True))
        if per_device and done:
            click.echo(report.memory_per_device(table, done, fmt="rst"))
        return
    saved_results = _show_saved(table, root, profile_name, done)
    if saved_results:
        if per_device:
            click.echo(report.memory_per_device(table, saved_results, fmt="rst"))
        if not distributed:
            _write_plot("memory", table, saved_results, root, done)


# -- accuracy ------------------------------------------------------------------------------------------------------


@main.command("accuracy", context_settings=_CONTEXT)
@_malloc_option
@click.argument("model")
@click.option("--experiment", help="Train the row with this exact name (e.g. pipeline-256) [default: every row].")
@click.option(
    "--profile",
    type=click.Choice(["published", "quick"]),
    default="quick",
    show_default=True,
    help="Row sizes: quick (Fashion-MNIST, a small ResNet of the same family, a 2-core CPU) or published (ImageNet).",
)
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds a row (runs) [default: the config's].")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs [default: the config's].")
@_precision_option
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="quick: Fashion-MNIST directory (the four IDX files) [default: Debian's /usr/share/datasets/fashion-mnist]; published: ImageNet with train/ and val/ class folders.",
)
@_results_option("output")
@click.option("--quiet", is_flag=True, help="No progress lines (each quarter epoch, each seed).")
def accuracy_command(
    model: str,
    experiment: Optional[str],
    profile: str,
    seeds: Optional[int],
    epochs: Optional[int],
    precision: Optional[str],
    data: Optional[Path],
    output: Optional[Path],
    quiet: bool,
) -> None:
    """Train rows of MODEL's accuracy table with the same recipe, seeds and data order; top-1 error.

    Data-parallel rows run one process per replica (DistributedDataParallel, gloo on
    CPU); pipeline rows run GPipe with the row's balance and chunks. Each row's record
    is saved after every seed; then the table (mean ± std over seeds) prints beside the
    published one, with whether the pipeline rows sit within the data-parallel spread,
    and a PNG of validation error per epoch is written next to the results.

    Example: gpipe-bench accuracy resnet101 --experiment pipeline-256 --seeds 3
    """
    from .measure import accuracy
    from .measure.runner import RowInterrupted, run_rows

    cuda = torch.cuda.is_available()
    table = jobs.table_for(model, "accuracy")
    planned = jobs.resolve_accuracy(
        table, profile, experiment=experiment, epochs=epochs, seeds=seeds, data=data, cuda=cuda, precision=precision
    )
    root = output if output is not None else results.results_dir()

    def progress_for(job: jobs.Job) -> Any:
        def progress(r: accuracy.Report) -> None:
            if quiet:
                return
            where = f"{job.row.name} seed {r.seed + 1}/{len(job.seeds)} epoch {r.epoch}/{r.epochs}"
            if r.error is None:
                done = f"{100 * r.step // r.steps}% ({r.step}/{r.steps} steps)"
                click.echo(f"{where}: {done}, training loss {r.loss:.3f} ({r.seconds:.0f} s)", err=True)
            else:
                click.echo(f"{where}: validation error {r.error:.2f}% ({r.seconds:.0f} s)", err=True)

        return progress

    def before(job: jobs.Job) -> None:
        if not quiet:
            click.echo(
                f"{job.row.name}: {len(job.seeds)} seed(s) on {len(job.devices)} {jobs.accuracy_placement(job, cuda)}",
                err=True,
            )

    def measure(job: jobs.Job) -> results.Result:
        return accuracy.run(job, progress_for(job), save=lambda r: results.save(r, root))

    def saved(job: jobs.Job, result: results.Result, path: Optional[Path]) -> None:
        click.echo(
            f"{job.row.name}: {report.mean_std(result)} % top-1 error over {len(result.samples)} seed(s)", err=True
        )

    try:
        done = run_rows(planned, measure, root, before=before, after=saved)
    except RowInterrupted as interrupt:
        _interrupted(interrupt, "; finished seeds are saved (status interrupted).")
        return
    saved_results = _show_saved(table, root, profile, done)
    if saved_results:
        for line in report.transparency(table, saved_results):
            click.echo(f"- {line}")
        _write_plot("accuracy", table, saved_results, root, done)


# -- table / compare -----------------------------------------------------------------------------------------------


@main.command("table", context_settings=_CONTEXT)
@click.argument("table_name", metavar="TABLE")
@click.option(
    "--format", "fmt", type=click.Choice(["rst", "md"]), default="rst", show_default=True, help="Output format."
)
@click.option(
    "--profile", type=click.Choice(["published", "quick"]), help="Only results of this profile [default: all]."
)
@click.option(
    "--published/--no-published", default=True, show_default=True, help="Show the published columns beside ours."
)
@_results_option("root")
@click.option("--per-device", is_flag=True, help="Memory tables: also each device's model memory and peaks.")
def table_command(
    table_name: str, fmt: str, profile: Optional[str], published: bool, root: Optional[Path], per_device: bool
) -> None:
    """Render saved results of TABLE in the published layout (one table per hardware and profile).

    Example: gpipe-bench table resnet101-speed --format md
    """
    table = config.load(table_name)
    if per_device and table.kind != "memory":
        raise click.BadParameter(
            f"{table.name} is a {table.kind} table; --per-device is for memory tables", param_hint="--per-device"
        )
    saved = results.load_all(root or results.results_dir(), table=table.name, profile=profile, on_skip=_skipped)
    if not saved:
        click.echo(
            f"No results for {table.name} yet; measure some with: gpipe-bench {table.kind} {table.model}", err=True
        )
    click.echo(report.render(table, saved, fmt=fmt, published=published))
    if per_device and saved:
        click.echo(report.memory_per_device(table, saved, fmt=fmt))


@main.command("predict", context_settings=_CONTEXT)
@click.argument("model")
@_malloc_option
@_row_options
@_override_options(", e.g. 26,22,33,44,44,66,66,69 [default: the row's]")
@_cost_options(
    "Time every layer on the device at hand, at each row's micro-batch size and per-worker thread count",
    "Our engine; torchgpipe 0.0.7, the archived peer (its own cost per cell, autograd's backward: one thread for "
    "every CPU partition), measured where it is installed; or torch.distributed.pipelining (one process per "
    "stage; --schedule, --nproc).",
    engines=("gpipe-bench", "torchgpipe", "distributed"),
)
@_precision_option
@click.option(
    "--schedule",
    type=click.Choice(list(jobs.SCHEDULES)),
    default="gpipe",
    show_default=True,
    help="--engine distributed: fill-drain, one-forward-one-backward, or interleaved 1F1B.",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    help="--engine distributed: processes [default: one per stage; half the stages with interleaved].",
)
@click.option(
    "--timeline",
    "timeline_path",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Write the simulated step as PATH.png and PATH.json (a Chrome trace), drawn as `speed --timeline` "
    "draws a measured one; several rows: PATH-<row>.png/.json each.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["rst", "md", "json"]), default="rst", show_default=True, help="Output format."
)
@_results_option("root")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def predict_command(
    model: str,
    pipeline: Optional[int],
    naive: Optional[int],
    experiment: Optional[str],
    devices_spec: Optional[str],
    profile: Optional[str],
    batch_size: Optional[int],
    chunks: Optional[int],
    balance: Optional[str],
    checkpoint: Optional[str],
    hardware: Optional[str],
    hardware_file: Optional[Path],
    cost_source: Optional[str],
    calibrate: Optional[str],
    host_speed: float,
    engine: str,
    precision: Optional[str],
    schedule: str,
    nproc: Optional[int],
    timeline_path: Optional[Path],
    fmt: str,
    root: Optional[Path],
    quiet: bool,
) -> None:
    """Predict throughput, speedup, bubble and memory of MODEL's speed rows without running them.

    Per-layer costs (counted on meta and put through a hardware preset's roofline, or timed on
    this machine), then one training step simulated as the engine schedules it: clocks,
    recomputation, copies, the shared interpreter, the host's cores. Printed beside the
    results measured for the table on matching hardware and the published figures.

    \b
    Example: gpipe-bench predict resnet101 --hardware p40 --calibrate naive-1=92.539
             gpipe-bench predict resnet101 --pipeline 2 --devices cpu:0,cpu:1 --timeline pipeline-2
    """
    from .environment import environment, hardware_key
    from .predict import hardware as presets
    from .predict.run import predict_table
    from .predict.sources import for_gpus, parse_calibration
    from .report import predicted

    if hardware == "list":
        click.echo(predicted.presets_table(presets.presets()))
        return
    chosen = _preset(hardware, hardware_file, cost_source)
    calibration = parse_calibration(calibrate)
    host_speed = _host_speed(host_speed, chosen)
    preset = presets.load(chosen) if chosen is not None else None
    if profile is None and preset is not None:
        profile, _ = jobs.default_profile(None, for_gpus(preset))
    table, profile_name, rows, _, profile_note = _rows("speed", model, profile, pipeline, naive, experiment, plain=True)
    overrides = Overrides(
        batch=batch_size, chunks=chunks, balance=_parse_balance(balance), checkpoint=checkpoint, precision=precision
    )
    if timeline_path is not None:
        timeline.check_writable(timeline_path)

    def progress(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    prediction = predict_table(
        table,
        profile_name,
        rows,
        overrides,
        devices_spec,
        hardware=chosen,
        calibration=calibration,
        engine=engine,
        schedule=schedule,
        nproc=nproc,
        progress=progress,
        host_speed=host_speed,
    )
    _note(profile_note, quiet or fmt == "json")
    if prediction.fitted is not None:
        name, figure, efficiency = prediction.fitted
        progress(
            f"fitted: efficiency {efficiency:.3f} of the {prediction.hardware} preset's peaks, from {name} = {figure:g}"
        )
    match = preset.name if preset is not None and preset.kind != "cpu" else hardware_key(environment(["cpu"]))
    saved = results.load_all(root or results.results_dir(), table=table.name, profile=profile_name, on_skip=_skipped)
    if fmt != "json":
        click.echo(f"{table.title}, {profile_name} profile, predicted from {prediction.costs}:")
    click.echo(predicted.render(prediction, saved, match, fmt))
    if timeline_path is not None:
        for p in prediction.rows:
            target = timeline_path if len(prediction.rows) == 1 else timeline.row_path(timeline_path, p.job.row.name)
            png, trace = timeline.paths(target)
            try:
                timeline.write(p.outcome.timeline, target)
            except ImportError as missing:
                progress(f"{p.job.row.name}: simulated timeline: {trace} (no PNG: {missing})")
                continue
            progress(f"{p.job.row.name}: simulated timeline: {png}, {trace}")


@main.command("plan", context_settings=_CONTEXT)
@click.argument("model")
@_malloc_option
@click.option(
    "--devices",
    "devices_spec",
    metavar="LIST",
    required=True,
    help="The devices to plan for, one stage each: e.g. 0,1,2,3 or cpu:0,cpu:1 (with --hardware, "
    "cuda:0,...,cuda:7 names eight of the preset's cards).",
)
@click.option("--batch", type=click.IntRange(min=1), help="Mini-batch size [default: the table's pipeline-N row's].")
@click.option(
    "--profile",
    type=click.Choice(["published", "quick"]),
    help="Input size and model of the table's profile [default: published for a GPU, quick for a CPU].",
)
@_cost_options(
    "Time the layers on the device at hand (once, at the table row's micro-batch size; other sizes scaled)",
    "Plan for our engine (checkpoint modes) or torch.distributed.pipelining (schedules, one process per device).",
)
@click.option(
    "--memory-per-device",
    "memory",
    metavar="SIZE",
    help="Keep only plans whose predicted peak fits, e.g. 16GiB [default: the GPU's or the preset's memory; "
    "on a CPU, 80% of the available host memory shared by the devices].",
)
@_precision_option
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, help="How many plans to print.")
@click.option(
    "--format", "fmt", type=click.Choice(["rst", "md", "json"]), default="rst", show_default=True, help="Output format."
)
@click.option("--quiet", is_flag=True, help="No progress lines.")
def plan_command(
    model: str,
    devices_spec: str,
    batch: Optional[int],
    profile: Optional[str],
    hardware: Optional[str],
    hardware_file: Optional[Path],
    cost_source: Optional[str],
    memory: Optional[str],
    engine: str,
    calibrate: Optional[str],
    host_speed: float,
    precision: Optional[str],
    top: int,
    fmt: str,
    quiet: bool,
) -> None:
    """Choose balance, micro-batches and checkpointing (or schedule) for MODEL on the given devices.

    Every micro-batch count and checkpoint mode gets the exact balance that minimises the
    slowest stage (layers, recomputation and copies at its cuts); the most promising are
    simulated step by step as `gpipe-bench predict` does, and those whose predicted peak
    memory fits the cap are printed, fastest first, each with the `gpipe-bench speed`
    command that runs it, beside the published configuration predicted the same way.

    \b
    Example: gpipe-bench plan resnet101 --devices cpu:0,cpu:1 --batch 64
             gpipe-bench plan resnet101 --hardware p40 --devices 0,1,2,3,4,5,6,7
    """
    from .predict.plan import parse_size, plan
    from .predict.sources import parse_calibration
    from .report import planned

    chosen = _preset(hardware, hardware_file, cost_source)
    cap = parse_size(memory) if memory is not None else None
    host_speed = _host_speed(host_speed, chosen)

    def progress(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    answer = plan(
        model,
        devices_spec,
        batch=batch,
        hardware=chosen,
        profile=profile,
        engine=engine,
        cap=cap,
        top=top,
        calibration=parse_calibration(calibrate),
        progress=progress,
        host_speed=host_speed,
        precision=precision,
    )
    click.echo(planned.render(answer, fmt))


@main.command("anchors", context_settings=_CONTEXT)
@click.argument("names", metavar="[ANCHOR]...", nargs=-1)
@click.option(
    "--format", "fmt", type=click.Choice(["rst", "md", "json"]), default="rst", show_default=True, help="Output format."
)
@click.option("--check", is_flag=True, help="Exit 1 when a predicted anchor not marked open leaves its tolerance.")
def anchors_command(names: Tuple[str, ...], fmt: str, check: bool) -> None:
    """Predict every public figure of gpipe_bench/predict/anchors.yaml and set it beside its source.

    Each anchor states its model, batch, precision, GPU, software and figure; it is
    predicted from the hardware presets alone (no calibration), so the ratio says how
    far predict and plan can be trusted on that card. The published P40 tables join
    in: throughput from the preset alone, speedups with the table's one calibration.
    ANCHOR names anchors or tables to check (default: all).

    Example: gpipe-bench anchors --check
    """
    from .predict import anchors
    from .report import anchors as anchor_report

    checked = anchors.check(names=names)
    if names and not checked:
        plain, tables = anchors.load()
        known = [a.name for a in plain] + [t.table for t in tables]
        raise HarnessError(f"no anchor named {', '.join(names)}; choose from: {', '.join(known)}", param="ANCHOR")
    click.echo(anchor_report.render(checked, fmt))
    missed = [c for c in checked if c.within is False and not c.open]
    if check and missed:
        click.echo(f"{len(missed)} anchor(s) outside their tolerance:", err=True)
        for c in missed:
            click.echo(
                f"  {c.name} {c.what}: predicted/published {c.ratio:.3f}, tolerance ±{c.tolerance:.0%}", err=True
            )
        sys.exit(1)


@main.command("compare", context_settings=_CONTEXT)
@click.argument("table_name", metavar="[TABLE]", required=False)
@click.option("--check", is_flag=True, help="Exit 1 when a row regresses beyond the table's tolerance.")
@click.option(
    "--format", "fmt", type=click.Choice(["rst", "md"]), default="rst", show_default=True, help="Output format."
)
@_results_option("root")
def compare_command(table_name: Optional[str], check: bool, fmt: str, root: Optional[Path]) -> None:
    """Our results against the published numbers, row by row, with flags and inconsistencies.

    Speed tables also show their published rows predicted on the published card
    (`gpipe-bench predict`, nothing runs); where the table's config says so, --check
    fails when a predicted speedup leaves the table's tolerance too.

    Example: gpipe-bench compare resnet101-speed --check
    """
    names = [table_name] if table_name else config.table_names()
    regressions: List[str] = []
    for name in names:
        table = config.load(name)
        saved = results.load_all(root or results.results_dir(), table=table.name, on_skip=_skipped)
        predicted = None
        if table.predicted:
            from .predict.run import predicted_speedups

            predicted = predicted_speedups(table)
        comparison = report.compare(table, saved, fmt=fmt, predicted=predicted)
        click.echo(comparison.text)
        regressions += [f"{table.name}: {r}" for r in comparison.regressions]
    if check and regressions:
        click.echo(f"{len(regressions)} regression(s):", err=True)
        for line in regressions:
            click.echo(f"  {line}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # torchrun -m gpipe_bench.cli ...
    from .distributed.launch import worker_main

    worker_main(main)
