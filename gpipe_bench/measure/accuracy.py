"""Accuracy: train a row of the transparency table with its recipe, over seeds; validation error per epoch.

The table's claim is that pipelining does not change what a model learns. So
both kinds of row train from the same initial weights (the seed), on the same
mini-batches in the same order with the same augmentation draws, under the
same learning-rate schedule; only the execution differs:

- data-parallel rows: one process per replica (``DistributedDataParallel``
  over gloo on CPU, NCCL on CUDA); replica ``r`` takes the ``r``-th slice of
  every mini-batch, so each replica normalises its own samples (per-replica
  BatchNorm statistics, as the published runs had);
- pipeline rows: :class:`~gpipe_bench.pipe.GPipe` with the row's balance,
  chunks and checkpoint mode; BatchNorm sees micro-batches (not deferred,
  as published, unless ``settings.extra.deferred_batch_norm``).

Error = 100 × (1 − accuracy) on the validation set after every epoch.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from gpipe_bench import models, optim, precision, signals
from gpipe_bench.data import fashion_mnist, imagenet
from gpipe_bench.engines import place
from gpipe_bench.environment import environment, now
from gpipe_bench.jobs import Job
from gpipe_bench.pipe import GPipe
from gpipe_bench.results import Result

__all__ = [
    "Dataset",
    "Folders",
    "Report",
    "REPORTS_PER_EPOCH",
    "RunningLoss",
    "load_dataset",
    "batches",
    "lr_at",
    "train",
    "run",
]

#: Progress reports per epoch: after each quarter of its steps, the last one with the validation error.
REPORTS_PER_EPOCH = 4


@dataclass(frozen=True)
class Report:
    """Where a seed's training stands: sent to the progress callback (from replica 0 for data-parallel rows).

    ``loss`` is the mean training loss over the steps since the previous report
    (for a data-parallel row, of replica 0's share of each mini-batch); ``error``
    is the validation error (%) at the end of an epoch, None before it.
    """

    seed: int
    epoch: int
    epochs: int
    step: int
    steps: int
    seconds: float
    loss: float
    error: Optional[float] = None


Progress = Callable[[Report], None]


@dataclass(frozen=True)
class Dataset:
    """Training and validation tensors, already shaped ``[N, C, S, S]`` float (normalised) and ``[N]`` labels.

    Grey images keep one channel (``C == 1``); :func:`batches` and the
    validation pass widen each batch to three, so the full Fashion-MNIST
    training set costs 188 MB, shared by every data-parallel process.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor


@dataclass(frozen=True)
class Folders:
    """ImageNet-style image folders (``train``, ``val`` torchvision datasets), read by DataLoader workers."""

    train: Any
    val: Any
    workers: int


Data = Union[Dataset, Folders]


def load_dataset(job: Job) -> Data:
    """The row's dataset: Fashion-MNIST (first ``dataset_size`` training, ``val_size`` test images), or
    ImageNet folders at ``job.data`` (``settings.extra.dataset: imagenet``)."""
    recipe = job.accuracy_settings
    if recipe.dataset == "imagenet":
        if job.data is None:
            raise fashion_mnist.DataError(
                f"profile {job.profile!r} trains on ImageNet: pass --data PATH with train/ and val/ class folders "
                "(or use --profile quick, Fashion-MNIST)"
            )
        # Normalisation statistics belong to the dataset: its module holds the default.
        norm = recipe.normalize if recipe.normalize is not None else {"mean": imagenet.MEAN, "std": imagenet.STD}
        train, val = imagenet.folders(job.data, job.settings.input_size, recipe.val_resize, norm)
        return Folders(train, val, workers=min(8, os.cpu_count() or 1))
    train_x, train_y = fashion_mnist.load("train", job.data)
    val_x, val_y = fashion_mnist.load("test", job.data)
    n, v = job.settings.dataset_size, recipe.val_size
    norm = recipe.normalize if recipe.normalize is not None else {"mean": fashion_mnist.MEAN, "std": fashion_mnist.STD}
    mean, std = float(norm["mean"][0]), float(norm["std"][0])
    size = job.settings.input_size

    def prepare(x: Tensor) -> Tensor:
        x = (x.float() / 255 - mean) / std
        pad = (size - x.size(-1)) // 2
        x = F.pad(x, (pad, size - x.size(-1) - pad, pad, size - x.size(-2) - pad), value=-mean / std)
        return x.unsqueeze(1)  # grey: one channel, widened to the model's three per batch (a third of the memory)

    return Dataset(prepare(train_x[:n]), train_y[:n].clone(), prepare(val_x[:v]), val_y[:v].clone())


def _three(x: Tensor) -> Tensor:
    """Grey images as the three channels the ResNet family's stem expects (a view, no copy)."""
    return x.expand(-1, 3, -1, -1) if x.size(1) == 1 else x


def _train_size(data: Data) -> int:
    return len(data.train) if isinstance(data, Folders) else int(data.train_x.size(0))


def batches(data: Data, batch: int, seed: int, epoch: int, crop: bool = True) -> Iterator[Tuple[Tensor, Tensor]]:
    """The epoch's mini-batches: a seeded order and seeded augmentation (random crop with padding 4 unless
    ``crop`` is false, horizontal flip).

    Every row with the same seed gets exactly these tensors, whatever executes it.
    For image folders the order is seeded the same way and the loader's workers
    are seeded from it; their augmentation draws depend on the worker count.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if isinstance(data, Folders):
        order = torch.randperm(len(data.train), generator=generator).tolist()
        plan = [order[k : k + batch] for k in range(0, len(order) - batch + 1, batch)]
        loader = DataLoader(data.train, batch_sampler=plan, num_workers=data.workers, generator=generator)
        yield from loader
        return
    n = data.train_x.size(0)
    shuffled = torch.randperm(n, generator=generator)
    size = data.train_x.size(-1)
    background = float(data.train_x.min())  # the padding: once per epoch, not per batch (a pass over the set)
    for start in range(0, n - batch + 1, batch):
        index = shuffled[start : start + batch]
        # Drawn even without the crop, so the flips (and the next batch's draws) stay the same either way.
        shifts = torch.randint(0, 9, (batch, 2), generator=generator)
        flips = torch.rand(batch, generator=generator) < 0.5
        if crop:
            x = F.pad(data.train_x[index], (4, 4, 4, 4), value=background)
            out = torch.stack([x[k, :, dy : dy + size, dx : dx + size] for k, (dy, dx) in enumerate(shifts.tolist())])
        else:
            out = data.train_x[index]  # the centred crop of the padded image: the image itself (a copy)
        out[flips] = out[flips].flip(-1)
        yield _three(out), data.train_y[index]


def lr_at(job: Job, batch: int, iteration: int, steps_per_epoch: int) -> float:
    """lr × B / lr_scale_batch, linear warm-up stepped per iteration, ×gamma at each milestone epoch.

    Warm-up and milestones may be fractions of an epoch (a run of a few epochs
    scales the published 4 of 90 and 30/60/80 down to its length); each is
    rounded to the nearest iteration.
    """
    recipe = job.accuracy_settings
    base = float(job.settings.optimizer.get("lr", 0.1)) * batch / recipe.lr_scale_batch
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    if iteration < warmup:
        return base * (iteration + 1) / warmup
    drops = sum(1 for m in recipe.lr_milestones if iteration >= round(m * steps_per_epoch))
    return base * recipe.lr_gamma**drops


def _memory_format(job: Job) -> torch.memory_format:
    """``settings.extra.memory_format``: channels_last runs the small convolutions of the quick profile
    up to 1.8x faster on a CPU; every row of a table gets the same, and the record names it."""
    return torch.channels_last if job.accuracy_settings.memory_format == "channels_last" else torch.contiguous_format


def _build(job: Job, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return models.build(job.model_name, **job.model_args).to(memory_format=_memory_format(job))


@torch.no_grad()
def _error(model: nn.Module, data: Data, device: torch.device, layout: torch.memory_format, chosen: str) -> float:
    model.eval()
    correct, total = 0, 0
    if isinstance(data, Folders):
        pairs: Any = DataLoader(data.val, batch_size=250, num_workers=data.workers)
    else:
        pairs = ((_three(data.val_x[k : k + 250]), data.val_y[k : k + 250]) for k in range(0, data.val_x.size(0), 250))
    for x, y in pairs:
        with precision.whole_step(chosen), precision.forward_pass(chosen, device.type):
            logits = model(x.to(device).contiguous(memory_format=layout))
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += int(y.numel())
    model.train()
    return 100.0 * (1 - correct / total)


@dataclass(frozen=True)
class Trained:
    """One seed of a row trained: validation error (%) after every epoch, and steps skipped on overflow (fp16)."""

    errors: List[float]
    skipped: int = 0


class RunningLoss:
    """The training loss summed where it is computed; read as a float only when a report needs it.

    Why: reading each step's loss (``float(loss)``) waits for the device between
    the forward and the backward, a host synchronisation per step on CUDA. The
    sum stays on the loss's device, detached, in float64 so that the mean read
    at a report equals the sum of the per-step floats the loop used to add up
    (each float32 loss is exact in float64, added in the same order). A loss
    that is not finite is caught when the sum is read: the report names the
    steps it lies between.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.total: Optional[Tensor] = None
        self.count = 0
        self.first = 1  # the first step (1-based) since the last read

    def add(self, loss: Tensor) -> None:
        """Add one step's loss on its device; nothing waits for it."""
        value = loss.detach().to(torch.float64)
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def mean(self, step: int) -> float:
        """The mean since the last read (0.0 with none), read at ``step`` (1-based); the sum starts again.

        Raises :class:`FloatingPointError` when a loss since the last read was not finite.
        """
        total = 0.0 if self.total is None else float(self.total)  # the one host synchronisation
        count, first = self.count, self.first
        self.total, self.count, self.first = None, 0, step + 1
        if not math.isfinite(total):
            raise FloatingPointError(f"{self.where}: loss is {total} in steps {first}-{step}")
        return total / max(count, 1)


def _train_loop(
    job: Job,
    model: nn.Module,
    data: Data,
    seed: int,
    *,
    replica: int = 0,
    replicas: int = 1,
    first: torch.device,
    last: torch.device,
    evaluate: Optional[Callable[[], float]],
    progress: Optional[Progress],
) -> Trained:
    batch = job.row.batch
    steps = _train_size(data) // batch
    optimizer = optim.build(job.settings.optimizer, model.parameters())
    chosen = job.row.precision
    scale = precision.LossScale(chosen, first.type)
    errors: List[float] = []
    start = time.perf_counter()
    marks = {round(steps * k / REPORTS_PER_EPOCH) for k in range(1, REPORTS_PER_EPOCH)} - {0, steps}
    share = batch // replicas
    crop = "random_crop" in job.accuracy_settings.train_transforms
    layout = _memory_format(job)
    epochs = job.settings.epochs
    for epoch in range(epochs):
        running = RunningLoss(f"{job.row.name} seed {seed}, epoch {epoch + 1}")
        for step, (x, y) in enumerate(batches(data, batch, seed, epoch, crop)):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(job, batch, epoch * steps + step, steps)
            x, y = x[replica * share : (replica + 1) * share], y[replica * share : (replica + 1) * share]
            optimizer.zero_grad()
            with precision.whole_step(chosen):
                with precision.forward_pass(chosen, first.type):
                    loss = F.cross_entropy(model(x.to(first).contiguous(memory_format=layout)), y.to(last))
                running.add(loss)
                scale.backward(loss)
            scale.step(optimizer)
            if step + 1 in marks:
                mean = running.mean(step + 1)  # read (and checked) every quarter, printed or not
                if progress is not None:
                    progress(Report(seed, epoch + 1, epochs, step + 1, steps, time.perf_counter() - start, mean))
        mean = running.mean(steps)
        if evaluate is not None:
            errors.append(evaluate())
            if progress is not None:
                progress(Report(seed, epoch + 1, epochs, steps, steps, time.perf_counter() - start, mean, errors[-1]))
    return Trained(errors, scale.skipped)


def train_pipeline(job: Job, data: Data, seed: int, progress: Optional[Progress] = None) -> Trained:
    """Validation error per epoch of the pipeline row trained with ``seed``."""
    model = _build(job, seed)
    balance = list(job.row.balance or [len(model)])
    pipe = GPipe(
        model,
        balance,
        devices=list(job.devices)[: len(balance)],
        chunks=job.row.chunks,
        checkpoint=job.row.checkpoint,
        deferred_batch_norm=job.accuracy_settings.deferred_batch_norm,
    )
    first, last = pipe.devices[0], pipe.devices[-1]
    return _train_loop(
        job,
        pipe,
        data,
        seed,
        first=place(str(first)),
        last=place(str(last)),
        evaluate=lambda: _error(pipe, data, place(str(first)), _memory_format(job), job.row.precision),
        progress=progress,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _replica(rank: int, world: int, port: int, job: Job, data: Data, seed: int, queue: Any, parent: int) -> None:
    """One data-parallel process: its slice of every mini-batch; rank 0 reports the validation errors.

    It never outlives the run: it dies with its parent (even one killed by
    SIGKILL), and leaves Ctrl-C to the parent, which stops the replicas itself.
    """
    signals.die_with_parent(signal.SIGKILL, parent=parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device(job.devices[rank]) if job.devices[rank].startswith("cuda") else torch.device("cpu")
        if device.type == "cuda":
            # Else every replica opens a context (and NCCL its buffers) on GPU 0 too.
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=300)
        )
        model = _build(job, seed).to(device)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        errors = _train_loop(
            job,
            ddp,
            data,
            seed,
            replica=rank,
            replicas=world,
            first=device,
            last=device,
            evaluate=(lambda: _error(model, data, device, _memory_format(job), job.row.precision))
            if rank == 0
            else None,
            progress=(lambda report: queue.put(("progress", report))) if rank == 0 else None,
        )
        if rank == 0:
            queue.put(("done", errors))
        dist.destroy_process_group()
    except BaseException as error:  # noqa: BLE001 - reported once by the parent
        queue.put(("error", f"replica {rank}: {type(error).__name__}: {error}"))
        raise SystemExit(1) from None


def train_dataparallel(job: Job, data: Data, seed: int, progress: Optional[Progress] = None) -> Trained:
    """Validation error per epoch of the data-parallel row trained with ``seed``, one process per replica."""
    world = job.row.devices
    if job.row.batch % world:
        raise ValueError(f"{job.row.name}: batch {job.row.batch} does not split over {world} replicas")
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    procs = [
        context.Process(target=_replica, args=(r, world, port, job, data, seed, queue, os.getpid()), daemon=True)
        for r in range(world)
    ]
    with signals.on_stop(lambda: _kill(procs)):
        for p in procs:
            p.start()
        return _collect(job, procs, queue, progress)


def _kill(procs: List[Any]) -> None:
    """SIGKILL to every replica still running (a second signal: no time to wait)."""
    for p in procs:
        if p.pid is not None and p.exitcode is None:
            p.kill()


def _stop(procs: List[Any], grace_s: float = 2.0) -> None:
    """SIGTERM to every replica still running, ``grace_s`` for them to go, then SIGKILL."""
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in alive:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    _kill(alive)
    for p in alive:
        p.join(timeout=1.0)


def _collect(job: Job, procs: List[Any], queue: Any, progress: Optional[Progress]) -> Trained:
    """Rank 0's result from ``queue``; the replicas are stopped at once when the run is (SIGTERM, then SIGKILL)."""
    deadline = time.monotonic() + job.timeout_s
    errors: Optional[Trained] = None
    failure: Optional[str] = None
    try:
        while errors is None and failure is None:
            try:
                kind, payload = queue.get(timeout=1.0)
            except Exception:  # queue.Empty: check the processes are alive
                if time.monotonic() > deadline:
                    failure = f"{job.row.name}: no result after {job.timeout_s:.0f} s"
                elif any(p.exitcode not in (None, 0) for p in procs):
                    failure = f"{job.row.name}: a replica process exited with code " + ", ".join(
                        str(p.exitcode) for p in procs if p.exitcode not in (None, 0)
                    )
                continue
            if kind == "progress" and progress is not None:
                progress(payload)
            elif kind == "done":
                errors = payload
            elif kind == "error":
                failure = str(payload)
    except BaseException:
        failure = failure or "stopped"
        raise
    finally:
        # Finished: each replica exits by itself. Failed or stopped: none is waited for.
        for p in procs:
            p.join(timeout=30 if failure is None else 0)
        _stop(procs)
    if failure is not None:
        raise RuntimeError(failure)
    assert errors is not None
    return errors


def train(job: Job, data: Data, seed: int, progress: Optional[Progress] = None) -> Trained:
    """Validation error (%) after every epoch of the row trained with ``seed``, and its skipped steps."""
    if job.row.mode == "dataparallel":
        return train_dataparallel(job, data, seed, progress)
    return train_pipeline(job, data, seed, progress)


def _settings(job: Job) -> Dict[str, Any]:
    return {**job.settings_record(), "extra": dict(job.settings.extra), "seeds": list(job.seeds)}


def record(
    job: Job, curves: Dict[int, List[float]], seconds: Dict[int, float], skipped: Optional[Dict[int, int]] = None
) -> Result:
    """The row's Result from the seeds finished so far (status "interrupted" until all are)."""
    finals = [curves[s][-1] for s in job.seeds if s in curves]
    complete = len(finals) == len(job.seeds)
    return Result(
        table=job.table.name,
        experiment=job.row.name,
        profile=job.profile,
        engine="gpipe-bench",
        kind="accuracy",
        metric=job.table.metric,
        unit=job.table.unit,
        value=sum(finals) / len(finals) if finals else None,
        status="ok" if complete else "interrupted",
        samples=finals,
        spread={},
        settings=_settings(job),
        environment=environment(list(job.devices)),
        extra={
            "curves": {str(s): c for s, c in curves.items()},
            "seconds": {str(s): t for s, t in seconds.items()},
            "seeds_done": [s for s in job.seeds if s in curves],
            **(
                {"skipped_steps": {str(s): n for s, n in (skipped or {}).items()}}
                if job.row.precision == "fp16"
                else {}
            ),
        },
        created=now(),
    )


def run(job: Job, progress: Optional[Progress] = None, save: Optional[Callable[[Result], object]] = None) -> Result:
    """Train every seed of the row; ``save`` is called with the record after each seed."""
    data = load_dataset(job)
    curves: Dict[int, List[float]] = {}
    seconds: Dict[int, float] = {}
    skipped: Dict[int, int] = {}
    for seed in job.seeds:
        start = time.perf_counter()
        trained = train(job, data, seed, progress)
        curves[seed], skipped[seed] = trained.errors, trained.skipped
        seconds[seed] = time.perf_counter() - start
        if save is not None:
            save(record(job, curves, seconds, skipped))
    return record(job, curves, seconds, skipped)
