"""The ``gpipe-bench`` command line: thin; parse, load, call, print.

Every mistake a user can make (unknown model, table or row, a bad option, a
balance that does not fit, missing devices) ends as one line naming the bad
value and the fix, exit code 2, and no results file.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import click
import torch

from . import __version__, config, devices, models, report, results
from .config import Overrides
from .errors import HarnessError

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Command(click.Command):
    """A command whose HarnessError is shown as click shows a usage error (one line naming the fix; exit 2)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
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
    gpipe-bench accuracy resnet101                the accuracy table (quick: Fashion-MNIST)
    gpipe-bench table resnet101-speed             saved results in the published layout
    gpipe-bench compare --check                   ours vs published; exit 1 on a regression
    gpipe-bench launch --nproc 2 -- speed resnet101 --pipeline 2 --engine distributed
                                                  the same row on torch's pipelining, 2 processes

    The engine is importable as gpipe_bench.pipe (torchgpipe 0.0.7's API).
    """


# -- list ----------------------------------------------------------------------


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
    click.echo("\nModels:")
    for name in models.names():
        click.echo(f"  {models.describe(name)}")


# -- speed ---------------------------------------------------------------------


def _parse_balance(value: Optional[str]) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    try:
        balance = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 26,22,33", param_hint="--balance") from None
    return balance


def _table_for(model: str, kind: str) -> str:
    """The table ``<model>-<kind>``; a one-line error naming the models that have such a table."""
    name = f"{model}-{kind}"
    if name not in config.table_names():
        known = [t[: -len(f"-{kind}")] for t in config.table_names() if t.endswith(f"-{kind}")]
        raise click.BadParameter(f"no {kind} table for {model!r}; choose one of: {', '.join(known)}", param_hint="MODEL")
    return name


def _default_profile(profile: Optional[str], quiet: bool) -> str:
    if profile is not None:
        return profile
    if torch.cuda.is_available():
        return "published"
    if not quiet:
        click.echo("No CUDA device: running the quick profile on virtual CPU devices (--profile published forces the published sizes).", err=True)
    return "quick"


class _Bar:
    """A progress bar per row with live samples/s; plain per-epoch lines with --quiet."""

    def __init__(self, row: str, epochs: int, quiet: bool) -> None:
        self.row, self.epochs, self.quiet = row, epochs, quiet
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
                length=self.epochs * steps, label=f"{self.row:>14s}", file=sys.stderr, show_eta=True,
                item_show_func=lambda _: f"{self.rate:9.2f} samples/s",
            )
            self.bar.__enter__()
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@main.command("speed", context_settings=_CONTEXT)
@click.argument("model")
@click.option("--pipeline", type=click.IntRange(min=1), help="Run the row pipeline-N.")
@click.option("--naive", type=click.IntRange(min=1), help="Run the row naive-N.")
@click.option("--experiment", help="Run the row with this exact name (e.g. pipeline-8).")
@click.option("--devices", "devices_spec", metavar="LIST", help="Devices, e.g. 0,1,2,3 or cuda:0*8 or cpu:0,cpu:1 [default: every CUDA device; virtual CPU devices without CUDA].")
@click.option("--profile", type=click.Choice(["published", "quick"]), help="Row sizes [default: published with CUDA, quick without].")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs, warm-up included [default: the config's].")
@click.option("--skip-epochs", type=click.IntRange(min=0), help="Warm-up epochs left out of the mean [default: the config's].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Mini-batch size [default: the row's].")
@click.option("--chunks", type=click.IntRange(min=1), help="Micro-batches per mini-batch [default: the row's].")
@click.option("--balance", help="Layers per partition, e.g. 26,22,33,44,44,66,66,69 [default: the row's].")
@click.option("--checkpoint", type=click.Choice(["always", "except_last", "never"]), help="Checkpoint mode [default: the row's].")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Results directory [default: results/].")
@click.option("--engine", type=click.Choice(["gpipe-bench", "torchgpipe", "distributed"]), default="gpipe-bench", show_default=True, help="The engine to time: ours; torchgpipe, the archived peer; distributed, torch.distributed.pipelining with one process per stage (run under torchrun or gpipe-bench launch).")
@click.option("--schedule", type=click.Choice(["gpipe", "1f1b", "interleaved"]), default="gpipe", show_default=True, help="--engine distributed: fill-drain (as published), one-forward-one-backward, or interleaved 1F1B (several stages per process, dealt round-robin).")
@click.option("--timeout", "timeout_s", type=click.IntRange(min=1), default=300, show_default=True, help="--engine distributed: seconds a rank waits for a peer before it fails (the process group's timeout).")
@click.option("--quiet", is_flag=True, help="Log lines instead of a progress bar.")
def speed_command(
    model: str, pipeline: Optional[int], naive: Optional[int], experiment: Optional[str], devices_spec: Optional[str],
    profile: Optional[str], epochs: Optional[int], skip_epochs: Optional[int], batch_size: Optional[int],
    chunks: Optional[int], balance: Optional[str], checkpoint: Optional[str], output: Optional[Path],
    engine: str, schedule: str, timeout_s: int, quiet: bool,
) -> None:
    """Measure training throughput of a row of MODEL's speed table, or of the whole table.

    The published method: a fixed synthetic batch, dataset_size // batch steps an epoch,
    warm-up epochs left out, the mean of the per-epoch samples/s (spread kept too).
    Each row is saved to the results directory; then the table prints beside the
    published one.

    Example: gpipe-bench speed resnet101 --pipeline 8 --devices 0,1,2,3,4,5,6,7
    """
    from .bench import speed  # torch-heavy; imported when used

    named = [flag for flag, value in (("--pipeline", pipeline), ("--naive", naive), ("--experiment", experiment)) if value is not None]
    if len(named) > 1:
        raise click.UsageError(f"{' and '.join(named)} both name a row; give one")
    table = config.load(_table_for(model, "speed"))
    profile_name = _default_profile(profile, quiet)
    chosen = table.profile(profile_name)
    if named:
        rows = [config.find_row(table, pipeline=pipeline, naive=naive, experiment=experiment, profile=profile_name)]
    else:
        rows = list(chosen.rows)
    overrides = Overrides(batch=batch_size, chunks=chunks, balance=_parse_balance(balance), checkpoint=checkpoint, epochs=epochs, skip_epochs=skip_epochs)
    if engine == "distributed":
        _speed_distributed(table, profile_name, rows, overrides, named != [], schedule, output, quiet, timeout_s)
        return
    jobs = []
    for row in rows:  # resolve and validate everything before the first measurement
        row, settings = config.apply(table, row, chosen.settings, overrides, model=chosen.model)
        plan = devices.resolve(devices_spec, len(row.balance) if row.balance else 1)
        jobs.append((speed.SpeedJob(table, row, settings, profile_name, plan.devices, engine), plan))
    root = output if output is not None else results.results_dir()
    results.check_writable(root)

    done: List[results.Result] = []
    for job, plan in jobs:
        if plan.note and not quiet:
            click.echo(f"{job.row.name}: {plan.note}", err=True)
        bar = _Bar(job.row.name, job.settings.epochs, quiet)
        try:
            result = speed.run(job, bar)
        except KeyboardInterrupt as interrupt:
            bar.close()
            finished = getattr(interrupt, "completed_epochs", 0)
            click.echo(f"\nInterrupted in {job.row.name} after {finished} of {job.settings.epochs} epochs; nothing written for it"
                       f" ({len(done)} earlier row(s) saved).", err=True)
            sys.exit(130)
        bar.close()
        path = results.save(result, root)
        figure = "Out of memory" if result.status == "oom" else f"{result.value:.3f} {result.unit}"
        click.echo(f"{job.row.name}: {figure}  -> {path}", err=True)
        done.append(result)

    _show_saved(table, root, profile_name, done)


def _show_saved(table: config.Table, root: Path, profile: str, done: List[results.Result]) -> List[results.Result]:
    """Print the table of every saved result on the hardware of the rows just run; those results (none if none ran)."""
    if not done:
        return []
    saved = results.load_all(root, table=table.name, profile=profile, hardware=done[0].hardware_key(), on_skip=_skipped)
    click.echo(report.render(table, saved, fmt="rst", published=True))
    return saved


def _speed_distributed(table: config.Table, profile: str, rows: List[config.Row], overrides: Overrides, named: bool,
                       schedule: str, output: Optional[Path], quiet: bool, timeout_s: int) -> None:
    """``speed --engine distributed`` on this rank: the rows whose stage count is the number of processes."""
    from .distributed import speed as dspeed

    def run(job: Any, rank: int) -> Optional[results.Result]:
        bar = _Bar(f"{job.row.name} ({schedule})", job.settings.epochs, quiet or rank != 0)
        result = dspeed.run_rank(job, schedule, bar if rank == 0 else None, timeout_s=timeout_s)
        bar.close()
        return result

    _run_distributed(table, profile, rows, overrides, named, schedule, output, run,
                     lambda r: f"{r.value:.3f} {r.unit}", per_device=False)


def _run_distributed(table: config.Table, profile: str, rows: List[config.Row], overrides: Overrides, named: bool,
                     schedule: str, output: Optional[Path], run: Callable[[Any, int], Optional[results.Result]],
                     figure: Callable[[results.Result], str], per_device: bool) -> None:
    """Run the rows this launch can run on this rank; rank 0 saves each record and prints the table."""
    from .distributed import speed as dspeed

    jobs, size = _distributed_jobs(table, profile, rows, overrides, named, schedule)
    rank = dspeed.rank()
    root = output if output is not None else results.results_dir()
    if rank == 0:
        results.check_writable(root)
    done: List[results.Result] = []
    for job in jobs:
        result = run(job, rank)
        if result is not None:
            path = results.save(result, root)
            processes = f"{size} process" + ("es" if size != 1 else "")
            click.echo(f"{job.row.name} ({result.engine}, {processes}): {figure(result)}  -> {path}", err=True)
            done.append(result)
    saved = _show_saved(table, root, profile, done)
    if saved and per_device:
        click.echo(report.memory_per_device(table, saved, fmt="rst"))


@main.command("launch", context_settings={**_CONTEXT, "ignore_unknown_options": True})
@click.option("--nproc", type=click.IntRange(min=1), required=True, help="Processes on this host (one per stage).")
@click.option("--nnodes", default="1", show_default=True, help="Hosts, as torchrun takes it (e.g. 2 or 1:4).")
@click.option("--rdzv-endpoint", help="host:port of the rendezvous, for several hosts (torchrun's --rdzv-endpoint).")
@click.option("--rdzv-id", default="gpipe-bench", show_default=True, help="Rendezvous id shared by all hosts.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def launch_command(nproc: int, nnodes: str, rdzv_endpoint: Optional[str], rdzv_id: str, command: Tuple[str, ...]) -> None:
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


# -- memory --------------------------------------------------------------------


@main.command("memory", context_settings=_CONTEXT)
@click.argument("model")
@click.option("--pipeline", type=click.IntRange(min=1), help="Run the row pipeline-N.")
@click.option("--naive", type=click.IntRange(min=1), help="Run the row naive-N.")
@click.option("--experiment", help="Run the row with this exact name (e.g. pipeline-8).")
@click.option("--devices", "devices_spec", metavar="LIST", help="Devices, e.g. 0,1,2,3 or cuda:0*8 or cpu:0,cpu:1 [default: every CUDA device; virtual CPU devices without CUDA].")
@click.option("--profile", type=click.Choice(["published", "quick"]), help="Row sizes [default: published with CUDA, quick without].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Mini-batch size [default: the row's].")
@click.option("--chunks", type=click.IntRange(min=1), help="Micro-batches per mini-batch [default: the row's].")
@click.option("--balance", help="Layers per partition [default: the row's, or found by balance_by_size].")
@click.option("--checkpoint", type=click.Choice(["always", "except_last", "never"]), help="Checkpoint mode [default: the row's].")
@click.option("--predict-only", is_flag=True, help="Predict from the meta device only; run nothing (sizes rows this machine cannot hold).")
@click.option("--per-device", is_flag=True, help="Also print each device's model memory, measured and predicted peak.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Results directory [default: results/].")
@click.option("--engine", type=click.Choice(["gpipe-bench", "distributed"]), default="gpipe-bench", show_default=True, help="Ours, or torch.distributed.pipelining with one process per stage (under gpipe-bench launch or torchrun).")
@click.option("--schedule", type=click.Choice(["gpipe", "1f1b", "interleaved"]), default="gpipe", show_default=True, help="--engine distributed: the schedule (interleaved: several stages per process).")
@click.option("--timeout", "timeout_s", type=click.IntRange(min=1), default=300, show_default=True, help="--engine distributed: seconds a rank waits for a peer before it fails (the process group's timeout).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def memory_command(
    model: str, pipeline: Optional[int], naive: Optional[int], experiment: Optional[str], devices_spec: Optional[str],
    profile: Optional[str], batch_size: Optional[int], chunks: Optional[int], balance: Optional[str],
    checkpoint: Optional[str], predict_only: bool, per_device: bool, output: Optional[Path], engine: str,
    schedule: str, timeout_s: int, quiet: bool,
) -> None:
    """Measure and predict the memory of a row of MODEL's memory table, or of the whole table.

    Per row: parameters (counted on the meta device), model memory (parameters ×
    4 bytes × 3: weights, gradients, one optimizer buffer, in GiB), and peak
    activation memory summed over devices: measured over two training steps (CUDA:
    the allocator's peak reserved memory minus the model; CPU: the bytes tensors
    held, model state left out) and predicted from the meta device alone. Rows
    with a null balance get one from balance_by_size. Each row is saved to the
    results directory; then the table prints beside the published one, and a PNG
    of the per-device memory is written next to the results.

    Example: gpipe-bench memory amoebanetd --profile published --predict-only --per-device
    """
    from .bench import memory  # torch-heavy; imported when used

    named = [flag for flag, value in (("--pipeline", pipeline), ("--naive", naive), ("--experiment", experiment)) if value is not None]
    if len(named) > 1:
        raise click.UsageError(f"{' and '.join(named)} both name a row; give one")
    table = config.load(_table_for(model, "memory"))
    profile_name = _default_profile(profile, quiet)
    chosen = table.profile(profile_name)
    if named:
        rows = [config.find_row(table, pipeline=pipeline, naive=naive, experiment=experiment, profile=profile_name)]
    else:
        rows = list(chosen.rows)
    overrides = Overrides(batch=batch_size, chunks=chunks, balance=_parse_balance(balance), checkpoint=checkpoint)
    if engine == "distributed":
        _memory_distributed(table, profile_name, rows, overrides, bool(named), schedule, output, per_device, timeout_s)
        return
    jobs = []
    for row in rows:  # resolve and validate everything before the first measurement
        row, settings = config.apply(table, row, chosen.settings, overrides, model=chosen.model)
        partitions = row.devices if row.mode == "pipeline" else 1
        if predict_only:
            plan_devices = devices.parse(devices_spec)[:partitions] if devices_spec else None
            if plan_devices is not None and len(plan_devices) < partitions:
                raise click.BadParameter(f"{len(plan_devices)} device(s) given for {partitions} partitions; give {partitions}",
                                         param_hint="--devices")
            chosen_devices = plan_devices or ([f"cuda:{j}" for j in range(partitions)] if profile_name == "published"
                                              else [f"cpu:{j}" for j in range(partitions)])
        else:
            chosen_devices = devices.resolve(devices_spec, partitions).devices
        jobs.append(memory.MemoryJob(table, row, settings, profile_name, chosen_devices))
    root = output if output is not None else results.results_dir()
    results.check_writable(root)

    done: List[results.Result] = []
    for job in jobs:
        if not quiet:
            what = "predicting" if predict_only else "predicting and measuring"
            click.echo(f"{job.row.name}: {what} on {', '.join(job.devices)}...", err=True)
        try:
            result = memory.run(job, predict_only=predict_only)
        except KeyboardInterrupt:
            click.echo(f"\nInterrupted in {job.row.name}; nothing written for it ({len(done)} earlier row(s) saved).", err=True)
            sys.exit(130)
        path = results.save(result, root)
        extra = result.extra
        if result.status == "oom":
            figure = "Out of memory" + (f" ({extra['note']})" if extra.get("note") else "")
        elif result.value is None:
            figure = "not measured"
        else:
            figure = f"{report.format_gib(result.value)} measured"
        click.echo(f"{job.row.name}: {figure}, {report.format_gib(extra['predicted_gib'])} predicted  -> {path}", err=True)
        done.append(result)

    saved = _show_saved(table, root, profile_name, done)
    if saved:
        if per_device:
            click.echo(report.memory_per_device(table, saved, fmt="rst"))
        _write_plot("memory", table, saved, root / table.name / profile_name / done[0].hardware_key() / "memory-per-device.png")


def _distributed_jobs(table: config.Table, profile: str, rows: List[config.Row], overrides: Overrides, named: bool,
                      schedule: str) -> Tuple[List[Any], int]:
    """The rows this torchrun launch can run (stage count = processes), validated; and the process count."""
    from .bench import speed
    from .distributed import schedule as dschedule
    from .distributed import speed as dspeed

    if not dspeed.in_torchrun():
        raise click.UsageError(
            "--engine distributed runs one process per stage (several with --schedule interleaved): start it with "
            "`gpipe-bench launch --nproc N -- ...` or `torchrun --nproc-per-node N -m gpipe_bench.cli ...`")
    size = dspeed.world()
    chosen = table.profile(profile)
    jobs = []
    for row in rows:
        row, settings = config.apply(table, row, chosen.settings, overrides, model=chosen.model)
        stages = len(row.balance) if row.balance else 1
        if row.batch % row.chunks:
            raise click.BadParameter(f"{row.name}: batch {row.batch} is not divisible by chunks {row.chunks} (torch's "
                                     "pipelining needs equal micro-batches); give --batch-size or --chunks that divide", param_hint="--chunks")
        problem = dschedule.check(schedule, stages, size, row.chunks)
        if problem is not None:
            if named:
                raise click.UsageError(f"{row.name}: {problem}")
            if schedule == "1f1b" and stages == size and dspeed.rank() == 0:
                click.echo(f"{row.name}: skipped: {row.chunks} micro-batch(es) for {stages} stages, fewer than 1f1b "
                           "needs (with one micro-batch every schedule is fill-drain: --schedule gpipe runs it)", err=True)
            continue
        jobs.append(speed.SpeedJob(table, row, settings, profile, [f"rank{r}" for r in range(size)],
                                    f"distributed-{schedule}"))
    if not jobs:
        wanted = f"{size} stage(s)" if schedule != "interleaved" else f"a multiple of {size} stages, at least {2 * size}"
        raise click.UsageError(f"no row of {table.name} ({profile}) has {wanted}; rows: "
                               + ", ".join(f"{r.name} ({len(r.balance) if r.balance else 1})" for r in chosen.rows))
    return jobs, size


def _memory_distributed(table: config.Table, profile: str, rows: List[config.Row], overrides: Overrides, named: bool,
                        schedule: str, output: Optional[Path], per_device: bool, timeout_s: int) -> None:
    from .distributed import memory as dmemory

    def figure(result: results.Result) -> str:
        per_rank = ", ".join(report.format_gib(v) for v in result.extra["measured_per_device_gib"])
        return f"{report.format_gib(result.value)} (per rank: {per_rank})"

    _run_distributed(table, profile, rows, overrides, named, schedule, output,
                     lambda job, rank: dmemory.run_rank(job, schedule, timeout_s=timeout_s), figure, per_device)


def _write_plot(kind: str, table: config.Table, saved: List[results.Result], path: Path) -> None:
    """``plot.<kind>_plot`` of ``saved`` at ``path``; a line saying why not when matplotlib is missing."""
    try:
        from . import plot

        draw: Callable[[config.Table, List[results.Result], Path], Path] = getattr(plot, f"{kind}_plot")
        written = draw(table, saved, path)
    except ImportError as missing:
        click.echo(f"No plot: {missing}", err=True)
        return
    click.echo(f"Plot: {written}", err=True)


# -- accuracy ------------------------------------------------------------------


@main.command("accuracy", context_settings=_CONTEXT)
@click.argument("model")
@click.option("--experiment", help="Train the row with this exact name (e.g. pipeline-256) [default: every row].")
@click.option("--profile", type=click.Choice(["published", "quick"]), default="quick", show_default=True,
              help="Row sizes: quick (Fashion-MNIST, a small ResNet of the same family, a 2-core CPU) or published (ImageNet).")
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds a row (runs) [default: the config's].")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs [default: the config's].")
@click.option("--data", type=click.Path(path_type=Path), help="quick: Fashion-MNIST directory (the four IDX files) [default: Debian's /usr/share/datasets/fashion-mnist]; published: ImageNet with train/ and val/ class folders.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Results directory [default: results/].")
@click.option("--quiet", is_flag=True, help="No per-epoch lines.")
def accuracy_command(model: str, experiment: Optional[str], profile: str, seeds: Optional[int], epochs: Optional[int],
                     data: Optional[Path], output: Optional[Path], quiet: bool) -> None:
    """Train rows of MODEL's accuracy table with the same recipe, seeds and data order; top-1 error.

    Data-parallel rows run one process per replica (DistributedDataParallel, gloo on
    CPU); pipeline rows run GPipe with the row's balance and chunks. Each row's record
    is saved after every seed; then the table (mean ± std over seeds) prints beside the
    published one, with whether the pipeline rows sit within the data-parallel spread,
    and a PNG of validation error per epoch is written next to the results.

    Example: gpipe-bench accuracy resnet101 --experiment pipeline-256 --seeds 3
    """
    from .bench import accuracy  # torch-heavy; imported when used
    from .data import fashion_mnist, imagenet

    table = config.load(_table_for(model, "accuracy"))
    chosen = table.profile(profile)
    rows = [table.row(experiment, profile)] if experiment else list(chosen.rows)
    overrides = Overrides(epochs=epochs)
    # A missing or malformed dataset is one line, before anything runs.
    if str(chosen.settings.extra.get("dataset", "")) == "imagenet":
        if data is None:
            raise click.BadParameter(f"the {profile} profile trains on ImageNet: give PATH with train/ and val/ class "
                                     "folders (or use --profile quick, Fashion-MNIST)", param_hint="--data")
        imagenet.check_layout(data)
    else:
        fashion_mnist.locate(data)
    count = seeds if seeds is not None else int(chosen.settings.extra.get("runs", 3))
    jobs = []
    for row in rows:
        row, settings = config.apply(table, row, chosen.settings, overrides, model=chosen.model)
        if row.mode == "dataparallel":
            chosen_devices = (devices.resolve(None, row.devices).devices if torch.cuda.is_available()
                              else ["cpu"] * row.devices)
        elif torch.cuda.is_available():
            chosen_devices = devices.resolve(None, len(row.balance or (1,))).devices
        else:
            # What a pipeline row learns does not depend on where its partitions run: on a CPU they share one
            # worker (the same micro-batches, checkpoints and BatchNorm), which trains 1.5-2x faster than
            # virtual devices competing for the same cores.
            chosen_devices = ["cpu"] * len(row.balance or (1,))
        jobs.append(accuracy.AccuracyJob(table, row, settings, profile, chosen_devices, list(range(count)), data))
    root = output if output is not None else results.results_dir()
    results.check_writable(root)

    def progress_for(name: str) -> Any:
        def progress(seed: int, epoch: int, total: int, error: float, seconds: float) -> None:
            if not quiet:
                click.echo(f"{name} seed {seed + 1}/{count} epoch {epoch}/{total}: validation error {error:.2f}% "
                           f"({seconds:.0f} s)", err=True)
        return progress

    done: List[results.Result] = []
    for job in jobs:
        where = ("processes" if job.row.mode == "dataparallel" else
                 "partitions on one CPU worker" if not torch.cuda.is_available() else "devices")
        if not quiet:
            click.echo(f"{job.row.name}: {count} seed(s) on {len(job.devices)} {where}", err=True)
        try:
            result = accuracy.run(job, progress_for(job.row.name), save=lambda r: results.save(r, root))
        except KeyboardInterrupt:
            click.echo(f"\nInterrupted in {job.row.name}; finished seeds are saved (status interrupted).", err=True)
            sys.exit(130)
        click.echo(f"{job.row.name}: {report.mean_std(result)} % top-1 error over {len(result.samples)} seed(s)", err=True)
        done.append(result)

    saved = _show_saved(table, root, profile, done)
    if saved:
        for line in report.transparency(table, saved):
            click.echo(f"- {line}")
        _write_plot("accuracy", table, saved, root / table.name / profile / done[0].hardware_key() / "error-per-epoch.png")


# -- table / compare -----------------------------------------------------------


def _table_arg(name: str) -> config.Table:
    return config.load(name)


@main.command("table", context_settings=_CONTEXT)
@click.argument("table_name", metavar="TABLE")
@click.option("--format", "fmt", type=click.Choice(["rst", "md"]), default="rst", show_default=True, help="Output format.")
@click.option("--profile", type=click.Choice(["published", "quick"]), help="Only results of this profile [default: all].")
@click.option("--published/--no-published", default=True, show_default=True, help="Show the published columns beside ours.")
@click.option("--results", "root", type=click.Path(file_okay=False, path_type=Path), help="Results directory [default: results/].")
@click.option("--per-device", is_flag=True, help="Memory tables: also each device's model memory and peaks.")
def table_command(table_name: str, fmt: str, profile: Optional[str], published: bool, root: Optional[Path],
                  per_device: bool) -> None:
    """Render saved results of TABLE in the published layout (one table per hardware and profile).

    Example: gpipe-bench table resnet101-speed --format md
    """
    table = _table_arg(table_name)
    if per_device and table.kind != "memory":
        raise click.BadParameter(f"{table.name} is a {table.kind} table; --per-device is for memory tables", param_hint="--per-device")
    saved = results.load_all(root or results.results_dir(), table=table.name, profile=profile, on_skip=_skipped)
    if not saved:
        click.echo(f"No results for {table.name} yet; measure some with: gpipe-bench {table.kind} {table.model}", err=True)
    click.echo(report.render(table, saved, fmt=fmt, published=published))
    if per_device and saved:
        click.echo(report.memory_per_device(table, saved, fmt=fmt))


@main.command("compare", context_settings=_CONTEXT)
@click.argument("table_name", metavar="[TABLE]", required=False)
@click.option("--check", is_flag=True, help="Exit 1 when a row regresses beyond the table's tolerance.")
@click.option("--format", "fmt", type=click.Choice(["rst", "md"]), default="rst", show_default=True, help="Output format.")
@click.option("--results", "root", type=click.Path(file_okay=False, path_type=Path), help="Results directory [default: results/].")
def compare_command(table_name: Optional[str], check: bool, fmt: str, root: Optional[Path]) -> None:
    """Our results against the published numbers, row by row, with flags and inconsistencies.

    Example: gpipe-bench compare resnet101-speed --check
    """
    names = [table_name] if table_name else config.table_names()
    regressions: List[str] = []
    for name in names:
        table = _table_arg(name)
        saved = results.load_all(root or results.results_dir(), table=table.name, on_skip=_skipped)
        comparison = report.compare(table, saved, fmt=fmt)
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
