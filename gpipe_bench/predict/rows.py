"""A table row's predicted step: its cells built from per-layer costs, its engine's schedule simulated.

Why here and not in the simulator: which layers make a partition, the
micro-batch sizes, which micro-batches are recomputed, how many threads a
worker gets and which rows train the plain model are the harness's rules
(:mod:`gpipe_bench.perf`, :class:`gpipe_bench.jobs.Job`); the simulator only
knows cells. This module is where the two meet, so a prediction follows the
same rules as the run it predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from gpipe_bench.distributed.schedule import default_processes
from gpipe_bench.errors import HarnessError
from gpipe_bench.jobs import Job
from gpipe_bench.perf import checkpoint_stop, layer_ranges, micro_batch_sizes
from gpipe_bench.precision import DEFAULT

from .costs import Costs, ModelKey
from .orders import orders, stage_ranks
from .simulate import CellCost, Extra, Host, LayerCost, Outcome, gpipe, pipelining, plain, rank_threads, worker_threads

__all__ = ["RowPrediction", "model_key", "meta_model", "step", "predict", "calibrate", "cost_sizes", "SCHEDULES"]

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass
class RowPrediction:
    """What a row is predicted to do: one step simulated, and the throughput it gives."""

    job: Job
    outcome: Outcome
    memory: Optional[List[int]] = None  # peak activation bytes per device (the memory predictor)
    speedup: Optional[float] = None
    # GPU rows: what the caching allocator would reserve / allocate per device, minus the model memory.
    reserved: Optional[List[int]] = None
    allocated: Optional[List[int]] = None

    @property
    def throughput(self) -> float:
        return self.job.row.batch / self.outcome.seconds if self.outcome.seconds > 0 else float("inf")


def model_key(job: Job) -> ModelKey:
    """What ``job``'s costs are counted and timed for: its model, input size and precision."""
    return ModelKey.of(job.model_name, job.model_args, job.settings.input_size, job.row.precision)


def meta_model(key: ModelKey) -> torch.nn.Sequential:
    """The model on ``meta`` (shapes only), built once per model: parameter counts and the memory predictor read it.

    The same module whatever the precision (autocast changes what a forward computes in, not the model).
    """
    return _meta_model(replace(key, precision=DEFAULT))


@lru_cache(maxsize=4)
def _meta_model(key: ModelKey) -> torch.nn.Sequential:
    from gpipe_bench import models

    return models.build_meta(key.name, **dict(key.args))


@lru_cache(maxsize=16)
def _parameters(key: ModelKey) -> Tuple[Tuple[int, int], ...]:
    """(parameters, parameter tensors) per layer."""
    return tuple(
        (sum(p.numel() for p in layer.parameters()), sum(1 for _ in layer.parameters()))
        for layer in meta_model(key).children()
    )


def _balance(job: Job, layers: int) -> Tuple[int, ...]:
    if job.row.balance is None or not job.split:
        return (layers,)
    balance = tuple(job.row.balance)
    if sum(balance) != layers:
        raise HarnessError(
            f"{job.row.name}: balance {list(balance)} sums to {sum(balance)} but {job.model_name} has {layers} "
            "layers; give a balance that sums to the model's length",
            param="--balance",
        )
    return balance


def _sum(layers: Sequence[LayerCost], start: int, end: int) -> LayerCost:
    """Layers [start, end) as one: their seconds summed, the no-grad share weighted by each layer's forward."""
    part = layers[start:end]
    forward = sum(c.forward + c.forward_host for c in part)
    nograd = sum((c.forward + c.forward_host) * c.nograd for c in part) / forward if forward > 0 else 1.0
    return LayerCost(
        forward=sum(c.forward for c in part),
        backward=sum(c.backward for c in part),
        forward_host=sum(c.forward_host for c in part),
        backward_host=sum(c.backward_host for c in part),
        nograd=nograd,
    )


def _cell(
    cost: LayerCost,
    out_bytes: int = 0,
    accumulate: Tuple[float, float] = (0.0, 0.0),
    engine: Tuple[float, float] = (0.0, 0.0),
) -> CellCost:
    """A cell of ``cost``, sending ``out_bytes``: its backward plus (host, device) seconds of ``accumulate``,
    and the (forward, backward) host seconds the ``engine`` adds per cell."""
    return CellCost(
        forward=cost.forward,
        backward=cost.backward + accumulate[1],
        forward_host=cost.forward_host + engine[0],
        backward_host=cost.backward_host + accumulate[0] + engine[1],
        nograd=cost.nograd,
        out_bytes=out_bytes,
    )


def _processes(job: Job, stages: int) -> int:
    if job.engine != "distributed":
        return 1
    if job.devices and all(d.startswith("rank") for d in job.devices):
        return len(job.devices)
    return default_processes(job.schedule, stages)


def cost_sizes(job: Job, host: Host) -> List[Tuple[int, int]]:
    """The (micro-batch size, threads) pairs a row's cells need: what a measured cost source must time."""
    row = job.row
    if not job.split:
        return [(row.batch, host.threads)]
    sizes = micro_batch_sizes(row.batch, row.chunks)
    if job.engine == "distributed":
        stages = len(row.balance or ())
        t = rank_threads(_processes(job, stages), host)
        return [(s, t) for s in set(sizes)]
    return [(s, worker_threads(list(job.devices), host)) for s in set(sizes)]


def step(job: Job, costs: Costs) -> Outcome:
    """One simulated training step of ``job``'s row with ``costs``."""
    row = job.row
    key = costs.model
    params = _parameters(key)
    balance = _balance(job, len(params))
    host = costs.host
    title = f"{job.table.name} {row.name} ({job.profile})"

    def update(start: int, end: int, device: str, threads: int, kind: str) -> Tuple[float, float]:
        numel = sum(p for p, _ in params[start:end])
        tensors = sum(t for _, t in params[start:end])
        return costs.update(numel, tensors, device, threads, kind)

    if not job.split:
        device = job.devices[0]
        layers = costs.layers(row.batch, host.threads, device)
        extra = Extra(optimizer={device: update(0, len(params), device, host.threads, "optimizer")})
        return plain(_cell(_sum(layers, 0, len(layers))), device, host, extra, title)

    ranges = layer_ranges(balance)
    chunks = row.chunks
    sizes = micro_batch_sizes(row.batch, chunks)

    if job.engine == "distributed":
        stages = len(balance)
        processes = _processes(job, stages)
        threads = rank_threads(processes, host)
        rank_device = costs.rank_devices(processes)
        by_size: Dict[int, List[LayerCost]] = {s: costs.layers(s, threads, rank_device[0]) for s in set(sizes)}

        def stage_cell(s: int, i: int) -> CellCost:
            start, end = ranges[s]
            out = costs.boundary_bytes(end, sizes[i]) if s < stages - 1 else 0
            return _cell(_sum(by_size[sizes[i]], start, end), out)

        stage_of = stage_ranks(job.schedule, stages, processes)
        extra = Extra(
            optimizer={
                f"rank{r}": _merge(
                    [
                        update(*ranges[s], rank_device[r], threads, "optimizer")
                        for s in range(stages)
                        if stage_of[s] == r
                    ]
                )
                for r in range(processes)
            }
        )
        return pipelining(
            orders(job.schedule, stages, processes, len(sizes)),
            stage_cell,
            stage_of,
            rank_device,
            host,
            lambda src, dst: costs.rank_link(src.split()[-1], dst.split()[-1]),  # lanes: 'rank1 cuda:1'
            extra,
            title,
        )

    devices = list(job.devices)
    engine = costs.cell_host(job.engine)  # what the engine adds per cell, measured here
    threads = worker_threads(devices, host)
    by_size = {s: costs.layers(s, threads, devices[0]) for s in set(sizes)}
    n = len(balance)
    accumulate = [update(start, end, devices[j], threads, "accumulate") for j, (start, end) in enumerate(ranges)]
    cells: List[List[CellCost]] = []
    for i, size in enumerate(sizes):
        row_cells = []
        for j, (start, end) in enumerate(ranges):
            out = costs.boundary_bytes(end, size) if j < n - 1 else 0
            # The engine adds each later micro-batch's parameter gradients to the first's.
            added = accumulate[j] if i > 0 else (0.0, 0.0)
            row_cells.append(_cell(_sum(by_size[size], start, end), out, added, engine))
        cells.append(row_cells)
    lanes = list(dict.fromkeys(devices))
    optimizer: Dict[str, Tuple[float, float]] = {}
    for lane in lanes:
        parts = [update(*ranges[j], devices[j], host.threads, "optimizer") for j in range(n) if devices[j] == lane]
        optimizer[lane] = _merge(parts)
    stop = checkpoint_stop(row.checkpoint, chunks)
    return gpipe(cells, devices, stop, host, costs.link, Extra(optimizer=optimizer), title, job.engine)


def _merge(parts: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    return (sum(h for h, _ in parts), sum(d for _, d in parts))


def predict(jobs: Sequence[Job], costs: Costs, baseline: Optional[Job] = None) -> List[RowPrediction]:
    """Every job's prediction, with its speedup over ``baseline``'s prediction (same costs) when given."""
    out = [RowPrediction(job, step(job, costs)) for job in jobs]
    if baseline is not None:
        base = next((p for p in out if p.job.row.name == baseline.row.name), None)
        base_throughput = (
            base.throughput if base is not None else RowPrediction(baseline, step(baseline, costs)).throughput
        )
        for p in out:
            p.speedup = p.throughput / base_throughput
    return out


def calibrate(job: Job, throughput: float, make: Callable[[float], Costs]) -> Tuple[float, Costs]:
    """(efficiency, costs) such that ``job`` is predicted at ``throughput``: a bisection on the one fitted factor.

    Host time and link latency do not scale with the efficiency, so the
    throughput is not proportional to it; it is monotone, so a bisection on
    a log scale finds it. An efficiency outside (1e-4, 10) means the figure
    cannot come from this preset, which is an error rather than a fit.
    """
    if throughput <= 0:
        raise HarnessError(f"--calibrate needs a positive throughput (got {throughput})", param="--calibrate")
    lo, hi = 1e-4, 10.0
    costs = make(1.0)
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        costs = make(mid)
        got = job.row.batch / step(job, costs).seconds
        if got < throughput:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.0 + 1e-6:
            break
    efficiency = (lo * hi) ** 0.5
    costs = make(efficiency)
    got = job.row.batch / step(job, costs).seconds
    if abs(got / throughput - 1) > 0.01:
        raise HarnessError(
            f"{job.row.name}={throughput:g} cannot be reached with this preset (at most {got:.3g} samples/s with any "
            "efficiency): the host overhead alone is slower; check the figure or the preset",
            param="--calibrate",
        )
    return efficiency, costs
