"""Plan a pipeline: the balance, micro-batch count, checkpoint mode (and schedule) to run a model on given devices.

Why: the published balances were tuned by hand for P40s at 224x224. On any
other device, or at another input size, the layers cost something else and
the hand-made cut leaves one partition waiting for the other. The predictor
already says what a configuration will do; this module searches the
configurations and keeps the best ones that fit in memory.

How, for each micro-batch count ``m`` and checkpoint mode (or, for torch's
pipelining, each schedule and stage count):

1. **Balance, exactly.** Every layer's cost per micro-batch (forward,
   backward, the recomputed forward of checkpointed micro-batches, the
   host's work) is one weight; a stage also pays for the activation it
   receives and sends (its cuts). The slowest stage sets the pipeline's
   pace, so the balance minimises it:
   :func:`~gpipe_bench.pipe.balance.partition.solve_blocks`, an exact
   dynamic programme, not a greedy split. Under a memory cap, blocks whose
   estimated memory exceeds it are excluded from the programme.
2. **Ranked by the pipeline formula**, ``(m + k - 1) x slowest stage``
   (interleaving divides the fill by the stages per process), then the best
   few **simulated** step by step (:mod:`.rows`, the predictor itself: the
   barrier per clock, the shared interpreter, copies, the optimizer).
3. **Memory, exactly.** Each simulated plan's peak per device comes from
   the memory predictor (:mod:`gpipe_bench.memory.predict`, the engine's
   schedule replayed on ``meta``) plus its parameters and their gradients;
   plans over the cap are dropped. When none fits, the answer says the
   smallest cap that would have worked.

A precision (``--precision``) is the template row's: every configuration tried,
the published one and the plain baseline are costed in it (:func:`.rows.model_key`),
and each command it prints runs it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from gpipe_bench import jobs
from gpipe_bench.config import Checkpoint, Overrides, Table
from gpipe_bench.devices import available_host_bytes, memory_slots
from gpipe_bench.errors import HarnessError
from gpipe_bench.memory.allocator import ERA_CURRENT
from gpipe_bench.memory.predict import predict_job
from gpipe_bench.memory.reserved import allocator_for
from gpipe_bench.perf import checkpoint_stop, micro_batch_sizes
from gpipe_bench.pipe.balance.partition import block_cost, block_costs, solve_blocks
from gpipe_bench.precision import DEFAULT

from . import hardware as presets
from .costs import Costs, MeasuredCosts, ModelKey
from .hardware import Hardware, Link
from .rows import RowPrediction, cost_sizes, meta_model, model_key, step
from .simulate import LayerCost, rank_threads, worker_threads
from .sources import check_precision, for_gpus, preset_costs

__all__ = [
    "Choice",
    "StageWeights",
    "Planned",
    "Plan",
    "plan",
    "planned_balance",
    "resolve_planned",
    "chunk_choices",
    "CHECKPOINTS",
    "MAX_CELLS",
]

CHECKPOINTS: Tuple[Checkpoint, ...] = ("never", "except_last", "always")
#: At most this many cells (micro-batches x stages) per simulated step: a plan with more is not simulated.
MAX_CELLS = 2048
#: How many of the best estimated candidates are simulated.
SIMULATED = 5
#: What the CUDA context holds on each GPU outside the caching allocator: an allowance, not a measurement
#: (its size depends on the driver, the GPU and the kernels loaded; PyTorch's CUDA notes say it is not
#: counted by the allocator's statistics). Plans on GPUs are capped on predicted reserved memory plus this.
CUDA_CONTEXT = 512 * 2**20

#: The micro-batch size single-layer memory profiles are taken at (activations are scaled from it).
PROFILED = 4
#: A plan estimated over the cap by this factor is not simulated.
OVER = 1.25
#: ... of those estimated within this factor of the best estimate.
PROMISING = 2.0


@dataclass(frozen=True)
class Choice:
    """One configuration: what ``gpipe-bench speed`` takes as options."""

    balance: Tuple[int, ...]
    chunks: int
    checkpoint: Checkpoint
    schedule: str = "gpipe"  # torch's pipelining only
    processes: int = 0  # torch's pipelining only: ranks (stages / processes stages each)


@dataclass
class Planned:
    """A configuration, simulated: its throughput, peak memory per device and the command that runs it."""

    choice: Choice
    prediction: RowPrediction
    memory: Optional[List[int]]  # peak bytes per device (activations + parameters and gradients); None: unknown
    command: str

    @property
    def throughput(self) -> float:
        return self.prediction.throughput

    @property
    def peak(self) -> Optional[int]:
        return max(self.memory) if self.memory else None


@dataclass
class Plan:
    """The answer: the best plans that fit, the published configuration predicted the same way, and how."""

    table: Table
    profile: str
    model: str
    devices: List[str]
    batch: int
    engine: str
    costs: str
    cap: Optional[int]
    cap_source: str
    plans: List[Planned]
    published: Optional[Planned]
    baseline: Tuple[str, float]  # (what, throughput)
    considered: int
    simulated: int
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)
    precision: str = DEFAULT

    def speedup(self, planned: Planned) -> float:
        return planned.throughput / self.baseline[1]


def chunk_choices(batch: int, stages: int, published: Optional[int] = None) -> List[int]:
    """Micro-batch counts to try: powers of two up to the batch (and :data:`MAX_CELLS`), and the published one."""
    out = {1}
    m = 2
    while m <= batch and m * stages <= MAX_CELLS:
        out.add(m)
        m *= 2
    if published is not None and published <= batch and published * stages <= MAX_CELLS:
        out.add(published)
    return sorted(out)


# -- the cost of one stage --------------------------------------------------------------------------------------


def _forward_seconds(c: LayerCost, recomputed: float) -> Tuple[float, float]:
    """(host, device) seconds of a layer's forwards per micro-batch, on average over the step.

    The first forward (no-grad for the ``recomputed`` share checkpointed:
    :meth:`LayerCost.first_forward`, the simulator's rule) and the recompute of
    the checkpointed ones.
    """
    kept_host, kept = c.first_forward(False)
    first_host, first = c.first_forward(True)
    host = (1 - recomputed) * kept_host + recomputed * (first_host + c.forward_host)
    return host, (1 - recomputed) * kept + recomputed * (first + c.forward)


@dataclass(frozen=True)
class StageWeights:
    """Seconds per layer and micro-batch on its stage, device and host apart.

    On a GPU the host issues kernels while the device runs them, so a stage
    takes the longer of its device's total and its host's total: ``host`` is
    kept apart and :func:`~gpipe_bench.pipe.balance.partition.solve_blocks`
    minimises ``max(sum(device), sum(host))`` over the stage. On a CPU the worker
    does both one after the other: ``device`` holds the sum and ``host`` is None.
    """

    device: List[float]
    host: Optional[List[float]]


def _layer_weights(layers: Sequence[LayerCost], recomputed: float, gpu: bool) -> StageWeights:
    """Each layer's forwards (:func:`_forward_seconds`) and backward per micro-batch, device and host.

    ``recomputed``: the share of micro-batches checkpointed.
    """
    device, host = [], []
    for c in layers:
        h, d = _forward_seconds(c, recomputed)
        host.append(h + c.backward_host)
        device.append(d + c.backward)
    if gpu:
        return StageWeights(device, host)
    return StageWeights([d + h for d, h in zip(device, host)], None)


def _cut_costs(costs: Costs, link: Optional[Link], size: int, layers: int) -> List[float]:
    """Seconds a stage spends copying at each cut (the activation forward, its gradient back), per micro-batch."""
    if link is None:
        return [0.0] * (layers + 1)
    return [0.0] + [link.seconds(costs.boundary_bytes(cut, size)) for cut in range(1, layers)] + [0.0]


@dataclass(frozen=True)
class _MemoryForm:
    """A stage's estimated peak bytes as a block cost: per-layer weights plus what its cuts hold."""

    weights: List[float]
    enter: List[float]
    leave: List[float]

    def allowed(self, cap: float) -> torch.Tensor:
        """Blocks ``[s, e)`` whose estimated peak fits under ``cap`` (for :func:`solve_blocks`)."""
        return block_costs(self.weights, self.enter, self.leave) <= cap


# -- the search -------------------------------------------------------------------------------------------------


class _Search:
    """Everything one plan needs, computed once: the template row, the costs, the meta model's memory profiles."""

    def __init__(
        self,
        template: jobs.Job,
        costs: Costs,
        engine: str,
        cap: Optional[int],
        progress: Callable[[str], None],
    ) -> None:
        self.template = template
        self.costs = costs
        self.engine = engine
        self.cap = cap
        self.progress = progress
        self.devices = list(template.devices)
        self.key = model_key(template)
        self.meta = meta_model(self.key)
        self.layers = len(self.meta)
        self.gpu = costs.device_type == "cuda"
        self._memory_profiles: Dict[int, Tuple[List[int], List[int]]] = {}
        self._partition_profiles: Dict[object, object] = {}
        copies = 2 + sum(1 for k in ("momentum",) if template.settings.optimizer.get(k))
        self.copies = copies  # weights and gradients (and a momentum buffer): float32 each
        self.param_bytes = [sum(p.numel() for p in layer.parameters()) * 4 * copies for layer in self.meta.children()]
        # GPU plans: the caching allocator as it is set here (PYTORCH_CUDA_ALLOC_CONF), today's rules.
        self.allocator = allocator_for(ERA_CURRENT, self.devices)

    # -- time

    def threads(self, stages: int, processes: int) -> int:
        host = self.costs.host
        if self.engine == "distributed":
            return rank_threads(processes, host)
        return worker_threads(self.devices[:stages], host)

    def interpreter(self, chunks: int, checkpoint: Checkpoint, threads: int) -> float:
        """Seconds of forward host work per step: our engine's workers take turns at one interpreter for it."""
        size = micro_batch_sizes(self.template.row.batch, chunks)[0]
        layers = self.costs.layers(size, threads, self.devices[0])
        recomputed = checkpoint_stop(checkpoint, chunks) / chunks
        return chunks * sum(_forward_seconds(c, recomputed)[0] for c in layers)

    def weights(self, chunks: int, checkpoint: Checkpoint, threads: int) -> Tuple[StageWeights, List[float], int]:
        size = micro_batch_sizes(self.template.row.batch, chunks)[0]
        layers = self.costs.layers(size, threads, self.devices[0])
        recomputed = checkpoint_stop(checkpoint, chunks) / chunks
        if self.engine == "distributed":
            first, second = self.costs.rank_devices(2)
            link = self.costs.rank_link(first, second)
        else:
            link = self.costs.link(self.devices[0], self.devices[1]) if len(self.devices) > 1 else None
        cuts = _cut_costs(self.costs, link, size, self.layers)
        return _layer_weights(layers, recomputed, self.gpu), cuts, size

    # -- memory

    def _layer_memory(self) -> Tuple[List[int], List[int]]:
        """Per layer at :data:`PROFILED` samples: bytes kept for the backward, and output bytes (scaled later)."""
        from gpipe_bench.memory.predict import layer_held

        if not self._memory_profiles:
            s = self.template.settings
            sample = torch.empty(PROFILED, 3, s.input_size, s.input_size, device="meta")
            held = layer_held(self.meta, sample, precision=self.template.row.precision)
            self._memory_profiles[PROFILED] = held
        return self._memory_profiles[PROFILED]

    def memory_form(self, chunks: int, checkpoint: Checkpoint) -> _MemoryForm:
        """A stage's peak, estimated: the bytes its layers keep per micro-batch (scaled to its size) times the
        micro-batches holding them, its checkpointed boundaries, the input on the first, and its parameters
        with their gradients.

        Used to keep the balance programme under a cap and to skip plans far over it;
        every plan shown is then checked with the exact predictor.
        """
        size = micro_batch_sizes(self.template.row.batch, chunks)[0]
        scale = size / PROFILED
        held, outs = self._layer_memory()
        stop = checkpoint_stop(checkpoint, chunks)
        # Micro-batches holding every activation at once: those not checkpointed, or the one being recomputed
        # (the backward of the last micro-batch frees its activations before the first recompute).
        live = max(chunks - stop, 1)
        # With several micro-batches the engine keeps the first one's parameter gradients aside until the
        # second is added: one more float32 copy of the stage's parameters during the backward.
        params = [p * (1 + 1 / self.copies) if chunks > 1 else p for p in self.param_bytes]
        weights = [live * h * scale + p for h, p in zip(held, params)]
        s = self.template.settings
        enter = [0.0] * (self.layers + 1)
        enter[0] = float(self.template.row.batch * 3 * s.input_size * s.input_size * 4)
        leave = [0.0] + [float(stop * o * scale) for o in outs]
        return _MemoryForm(weights, enter, leave)

    def estimated_peak(self, choice: Choice) -> float:
        """The largest stage's estimated peak bytes (:meth:`memory_form`) for ``choice``'s balance."""
        form = self.memory_form(choice.chunks, choice.checkpoint)
        return max(block_cost(form.weights, choice.balance, form.enter, form.leave))

    def memory(self, job: jobs.Job) -> Optional[List[int]]:
        """Exact peak bytes per device of our engine's plan: the memory predictor plus the model state.

        On GPUs, what the caching allocator reserves over two steps (model state included)
        plus the CUDA context (:data:`CUDA_CONTEXT`): what decides whether the plan fits the card.
        """
        if job.engine == "distributed":
            return None
        balance = tuple(job.row.balance or (self.layers,))
        prediction = predict_job(job, balance if job.split else (), self.meta, self._partition_profiles, self.allocator)
        if prediction.reserved is not None:  # a GPU: the allocator's peaks and the context beside them
            return [r + m + CUDA_CONTEXT for r, m in zip(prediction.reserved, self._model_bytes(job, balance))]
        return [a + m for a, m in zip(prediction.per_device, self._model_bytes(job, balance))]

    def _model_bytes(self, job: jobs.Job, balance: Sequence[int]) -> List[int]:
        """The parameters and their state (:attr:`param_bytes`) per device of ``job``'s partitions."""
        if not job.split:
            return [sum(self.param_bytes)]
        distinct, slots = memory_slots(list(job.devices))
        model = [0] * len(distinct)
        start = 0
        for j, size in enumerate(balance):
            model[slots[j]] += sum(self.param_bytes[start : start + size])
            start += size
        return model

    # -- candidates

    def job(self, choice: Choice) -> jobs.Job:
        t = self.template
        row = replace(t.row, balance=choice.balance, chunks=choice.chunks, checkpoint=choice.checkpoint)
        if self.engine == "distributed":
            ranks = [f"rank{r}" for r in range(choice.processes)]
            return jobs.Job(t.table, row, t.settings, t.profile, ranks, "distributed", choice.schedule)
        return replace(t, row=row)

    def options(self) -> List[Tuple[Checkpoint, str, int, int]]:
        """(checkpoint, schedule, stages, processes) to try."""
        k = len(self.devices)
        if self.engine != "distributed":
            return [(c, "gpipe", k, 0) for c in CHECKPOINTS]
        out: List[Tuple[Checkpoint, str, int, int]] = [("never", "gpipe", k, k), ("never", "1f1b", k, k)]
        for per in (2, 4):
            if k * per <= self.layers:
                out.append(("never", "interleaved", k * per, k))
        return out

    def candidates(self, allowed_cap: Optional[float] = None) -> List[Tuple[float, Choice]]:
        """(estimated step seconds, choice) of every configuration, best balance each; fastest first."""
        from gpipe_bench.distributed import schedule as dschedule

        batch = self.template.row.batch
        out = []
        for checkpoint, schedule, stages, processes in self.options():
            for chunks in chunk_choices(batch, stages, self.template.row.chunks):
                if self.engine == "distributed":
                    if batch % chunks or dschedule.check(schedule, stages, processes, chunks) is not None:
                        continue
                elif chunks == 1 and checkpoint != "never":
                    continue  # one micro-batch: checkpointing only adds a recompute
                threads = self.threads(stages, processes)
                weights, cuts, _ = self.weights(chunks, checkpoint, threads)
                allowed = None
                if allowed_cap is not None and self.engine != "distributed":
                    allowed = self.memory_form(chunks, checkpoint).allowed(allowed_cap)
                balance = solve_blocks(weights.device, stages, cuts, cuts, allowed, weights.host)
                if balance is None:
                    continue
                slowest = max(block_cost(weights.device, balance, cuts, cuts, weights.host))
                per = stages // processes if schedule == "interleaved" else 1
                fill = (stages / per - 1) / per if schedule == "interleaved" else stages - 1
                estimate = (chunks + fill) * slowest * per
                if not self.gpu and chunks > 1 and stages > 1:
                    # CPU workers computing side by side slow each other down (measured: Host.contention);
                    # one micro-batch never overlaps, so naive splitting escapes it.
                    estimate *= 1 + self.costs.host.contention
                if self.engine != "distributed":
                    estimate = max(estimate, self.interpreter(chunks, checkpoint, threads))
                out.append((estimate, Choice(tuple(balance), chunks, checkpoint, schedule, processes)))
        out.sort(key=lambda pair: pair[0])
        return out

    def smallest_cap(self) -> Tuple[int, Choice]:
        """The least peak memory per device found: each mode's leanest balance by the estimate, the most
        promising few checked exactly (the estimate never overshoots by much, see :meth:`memory_form`)."""
        k = len(self.devices)
        lean: List[Tuple[float, Choice]] = []
        for checkpoint in CHECKPOINTS:
            for chunks in chunk_choices(self.template.row.batch, k):
                if chunks == 1 and checkpoint != "never":
                    continue
                form = self.memory_form(chunks, checkpoint)
                balance = solve_blocks(form.weights, k, form.enter, form.leave)
                if balance is not None:
                    estimate = max(block_cost(form.weights, balance, form.enter, form.leave))
                    lean.append((estimate, Choice(tuple(balance), chunks, checkpoint)))
        lean.sort(key=lambda pair: pair[0])
        exact = []
        for _, choice in lean[:4]:
            memory = self.memory(self.job(choice))
            assert memory is not None
            exact.append((max(memory), choice))
        return min(exact, key=lambda pair: pair[0])


def command(job: jobs.Job, devices: Sequence[str]) -> str:
    """The ``gpipe-bench speed`` command line that runs ``job``'s configuration."""
    row = job.row
    model = job.table.model
    stages = len(row.balance or ())
    parts = [
        f"gpipe-bench speed {model}",
        f"--profile {job.profile}",
        f"--pipeline {stages}",
    ]
    if job.engine == "distributed":
        parts.insert(0, f"gpipe-bench launch --nproc {len(job.devices)} --")
        parts[1] = f"speed {model}"
        parts += ["--engine distributed", f"--schedule {job.schedule}"]
    else:
        parts.append(f"--devices {','.join(devices)}")
    parts += [
        f"--batch-size {row.batch}",
        f"--chunks {row.chunks}",
        f"--balance {','.join(str(b) for b in row.balance or ())}",
    ]
    if job.engine != "distributed":
        parts.append(f"--checkpoint {row.checkpoint}")
    if row.precision != DEFAULT:
        parts.append(f"--precision {row.precision}")
    return " ".join(parts)


# -- entry points -----------------------------------------------------------------------------------------------


def _template(
    table: Table,
    profile: str,
    stages: int,
    batch: Optional[int],
    devices: List[str],
    layers: int,
    precision: Optional[str] = None,
) -> Tuple[jobs.Job, bool]:
    """(the row the plan varies, whether it is a published configuration).

    The table's ``pipeline-<stages>`` row of ``profile`` at ``batch``, in ``precision`` (None: the row's). A device
    count no row has gets the row of the nearest count (the larger one on a tie)
    with an even balance over ``stages``: its settings and micro-batch size, and
    nothing published to set beside the plans.
    """
    from gpipe_bench import config

    chosen = table.profile(profile)
    pipelines = [r for r in chosen.rows if r.mode == "pipeline" and r.balance is not None and not r.planned]
    if not pipelines:
        raise HarnessError(f"{table.name} ({profile}) has no pipeline row to plan from", param="MODEL")
    rows = [r for r in pipelines if r.devices == stages]
    published = bool(rows)
    row = rows[0] if rows else min(pipelines, key=lambda r: (abs(r.devices - stages), -r.devices))
    if not published:
        even = tuple(layers // stages + (1 if k < layers % stages else 0) for k in range(stages))
        row = replace(
            row, name=f"pipeline-{stages}", devices=stages, balance=even, published=replace(row.published, values={})
        )
    chunks = None
    if batch is not None and batch != row.batch:  # the published micro-batch size, kept at another batch
        chunks = max(1, min(batch, round(batch * row.chunks / row.batch)))
    # plan's own flag is --batch; the chunks are the planner's, kept at the row's micro-batch size
    overrides = Overrides(batch=batch, chunks=chunks, precision=precision, flags={"batch": "--batch", "chunks": ""})
    row, settings = config.apply(table, row, chosen.settings, overrides, model=chosen.model)
    return jobs.Job(table, row, settings, profile, devices), published


def _costs(
    template: jobs.Job,
    preset: Optional[Hardware],
    calibration: Optional[Tuple[str, float]] = None,
    host_speed: float = 1.0,
) -> Costs:
    key = model_key(template)
    if preset is not None:
        return preset_costs(template.table, template.profile, key, preset, calibration, None, host_speed)[0]
    if calibration is not None:
        raise HarnessError(
            "--calibrate fits a hardware preset's efficiency; give --hardware NAME with it", param="--calibrate"
        )
    return MeasuredCosts.here(key)


def default_cap(hardware: Optional[Union[str, Hardware]], devices: Sequence[str]) -> Tuple[Optional[int], str]:
    """(bytes per device, where it comes from): the preset's or the GPU's memory; on a CPU, a share of what is free."""
    if hardware is not None:
        preset = presets.load(hardware)
        if preset.kind != "cpu":
            return preset.memory, f"the {preset.name} preset's memory"
    if any(d.startswith("cuda") for d in devices) and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.device(devices[0])).total_memory
        return int(total), "the device's memory"
    available = available_host_bytes()
    if available is None:
        return None, "unknown (no /proc/meminfo)"
    distinct, _ = memory_slots(list(devices))
    return int(0.8 * available / len(distinct)), f"80% of the host's available memory, shared by {len(distinct)}"


def _check(devices: int, layers: int, batch: Optional[int], model: str) -> None:
    if devices > layers:
        raise HarnessError(
            f"{devices} devices for {model}'s {layers} layers: every stage needs a layer; give at most "
            f"{layers} devices",
            param="--devices",
        )
    if batch is not None and batch < devices:
        raise HarnessError(
            f"batch {batch} is smaller than the {devices} devices: the pipeline cannot keep each busy with "
            f"a sample; give --batch {devices} or more",
            param="--batch",
        )


def plan(
    model: str,
    devices_spec: str,
    *,
    batch: Optional[int] = None,
    hardware: Optional[Union[str, Hardware]] = None,
    profile: Optional[str] = None,
    engine: str = "gpipe-bench",
    cap: Optional[int] = None,
    top: int = 3,
    calibration: Optional[Tuple[str, float]] = None,
    progress: Callable[[str], None] = lambda line: None,
    host_speed: float = 1.0,
    precision: Optional[str] = None,
) -> Plan:
    """The ``top`` best configurations of ``model`` on ``devices_spec`` that fit ``cap`` bytes per device.

    ``hardware``: a preset's name, or a preset of one's own (:func:`.hardware.load_file`).
    ``host_speed``: with ``hardware``, the target host's speed per core against this one's.
    ``precision``: fp32, tf32, bf16 or fp16 (None: fp32); refused where ``hardware``
    (or this machine, without it) cannot run it.
    """
    from gpipe_bench import devices as device_specs

    started = time.perf_counter()
    table = jobs.table_for(model, "speed")
    preset = presets.load(hardware) if hardware is not None else None
    profile, _ = jobs.default_profile(profile, for_gpus(preset))
    devices = device_specs.parse(devices_spec)
    if engine == "distributed" and len(devices) < 2:
        raise HarnessError("--engine distributed plans one process per device; give two or more", param="--devices")
    chosen = table.profile(profile)
    any_row = chosen.rows[0]
    args = {**table.model_args, **chosen.model_args, **any_row.model_args, "num_classes": chosen.settings.classes}
    layers = len(meta_model(ModelKey.of(chosen.model or table.model, args, chosen.settings.input_size)))
    _check(len(devices), layers, batch, chosen.model or table.model)
    template, published_row = _template(table, profile, len(devices), batch, devices, layers, precision)
    check_precision(template, preset)
    _check(len(devices), layers, template.row.batch, template.model_name)
    cap_source = "--memory-per-device"
    if cap is None:
        cap, cap_source = default_cap(hardware, devices)
    costs = _costs(template, preset, calibration, host_speed)
    search = _Search(template, costs, engine, cap, progress)
    if isinstance(costs, MeasuredCosts):
        # One size timed (the published row's micro-batch), every other scaled from it: fixed part + per sample.
        costs.affine = True
        size = micro_batch_sizes(template.row.batch, template.row.chunks)[0]
        threads = search.threads(len(devices), len(devices))
        costs.prepare([(size, threads)], progress, concurrent=len(set(devices)) > 1)

    progress(f"searching balances, micro-batches and {'schedules' if engine == 'distributed' else 'checkpoints'}")
    ranked = search.candidates()
    considered = len(ranked)
    published_job = template if engine != "distributed" and published_row else None
    if engine == "distributed" and published_row:
        published_job = search.job(
            Choice(tuple(template.row.balance or ()), template.row.chunks, "never", "gpipe", len(devices))
        )
    planned, simulated = _simulate(search, ranked, top)
    notes: List[str] = []
    if cap is not None and engine != "distributed" and len(planned) < top:
        # Too few fit: search again with the cap inside the balance programme.
        progress("too few plans fit the memory cap: searching balances under it")
        seen = {p.choice for p in planned}
        extra, more = _simulate(
            search, [c for c in search.candidates(float(cap)) if c[1] not in seen], top - len(planned)
        )
        planned += extra
        simulated += more
        if not planned:
            need, choice = search.smallest_cap()
            if need <= cap:  # the leanest configuration fits where the estimates said none would
                leanest = _planned(search, search.job(choice))
                planned, simulated = [leanest], simulated + 1
        if not planned:
            raise HarnessError(
                f"no plan fits {_size_option(cap)} per device ({cap_source}); the smallest that works is {_size_option(need)} "
                f"(balance {','.join(map(str, choice.balance))}, chunks {choice.chunks}, checkpoint "
                f"{choice.checkpoint}): give --memory-per-device {_size_option(need, up=True)} or more",
                param="--memory-per-device",
            )
    if engine == "distributed":
        notes.append("peak memory is not predicted for torch's pipelining: no plan was filtered by memory")
    elif search.gpu:
        notes.append(
            "memory per GPU: what the CUDA caching allocator is predicted to reserve over two steps "
            f"(model state included) plus {CUDA_CONTEXT / 2**30:.1f} GiB for the CUDA context"
        )
    if not published_row:
        notes.append(
            f"{table.name} publishes no configuration over {len(devices)} devices: the plans start from "
            f"{template.row.chunks} micro-batches of its nearest row's size, with nothing published beside them"
        )
    planned.sort(key=lambda p: -p.throughput)
    published = None
    if published_job is not None:
        published = _planned(search, published_job)
    base_row = next((r for r in table.profile(profile).rows if r.name == "naive-1"), None)
    base_batch = base_row.batch if base_row is not None else template.row.batch
    base_job = replace(
        template,
        row=replace(template.row, mode="naive", balance=None, chunks=1, checkpoint="never", batch=base_batch),
        devices=devices[:1],
    )
    if isinstance(costs, MeasuredCosts):
        costs.prepare(cost_sizes(base_job, costs.host), progress, concurrent=False)
    baseline = (f"naive-1 (plain model, batch {base_batch})", base_job.row.batch / step(base_job, costs).seconds)
    return Plan(
        table,
        profile,
        model,
        devices,
        template.row.batch,
        engine,
        costs.description,
        cap,
        cap_source,
        planned[:top],
        published,
        baseline,
        considered,
        simulated,
        time.perf_counter() - started,
        notes,
        template.row.precision,
    )


def _simulate(search: _Search, ranked: Sequence[Tuple[float, Choice]], top: int) -> Tuple[List[Planned], int]:
    """The ``top`` fastest simulated plans that fit the cap, and how many were simulated.

    The :data:`SIMULATED` best estimates are simulated and sorted by throughput;
    memory (the slower prediction) is computed from the fastest down until
    ``top`` fit. If too few do, further candidates are tried one by one.
    """
    if search.cap is not None and search.engine != "distributed":
        ranked = [(e, c) for e, c in ranked if search.estimated_peak(c) <= OVER * search.cap]

    def simulated(choice: Choice) -> Planned:
        return _planned(search, search.job(choice), memory=False)

    def fits(p: Planned) -> bool:
        p.memory = search.memory(p.prediction.job)
        return search.cap is None or p.peak is None or p.peak <= search.cap

    # Candidates estimated much slower than the best are not worth a simulation (at least two are simulated).
    best = ranked[0][0] if ranked else 0.0
    promising = [c for e, c in ranked[:SIMULATED] if e <= PROMISING * best] or [c for _, c in ranked[:2]]
    promising = promising if len(promising) >= 2 else [c for _, c in ranked[:2]]
    first = sorted((simulated(c) for c in promising), key=lambda p: -p.throughput)
    tried = len(first)
    out: List[Planned] = []
    for p in first:
        if len(out) >= top:
            break
        if fits(p):
            out.append(p)
    for _, choice in ranked[len(promising) :]:
        if len(out) >= top or tried >= 4 * SIMULATED:
            break
        tried += 1
        p = simulated(choice)
        if fits(p):
            out.append(p)
    return out, tried


def _planned(search: _Search, job: jobs.Job, memory: bool = True) -> Planned:
    choice = Choice(
        tuple(job.row.balance or ()),
        job.row.chunks,
        job.row.checkpoint,
        job.schedule,
        len(job.devices) if job.engine == "distributed" else 0,
    )
    prediction = RowPrediction(job, step(job, search.costs))
    return Planned(choice, prediction, search.memory(job) if memory else None, command(job, search.devices))


def planned_balance(job: jobs.Job, costs: Optional[Costs] = None) -> Tuple[Tuple[int, ...], str]:
    """(balance, how it was found) for a row saying ``balance: planned``, on the row's own chunks and checkpoint.

    Costs default to timing the model here (at the row's micro-batch size and
    its workers' thread count); the balance is the exact optimum of the
    slowest stage (:func:`solve_blocks`), which is what the row then runs.
    """
    if costs is None:
        # One size, used as timed: two rounds and no fixed-part pass keep a table run's planning short.
        measured = MeasuredCosts.here(model_key(job), rounds=2)
        measured.fixed = False
        costs = measured
    stages = jobs.partitions(job.row)
    devices = list(job.devices)
    if stages > len(meta_model(model_key(job))):
        raise HarnessError(f"{job.row.name}: more partitions ({stages}) than layers", param="--balance")
    search = _Search(job, costs, job.engine, None, lambda line: None)
    threads = search.threads(stages, stages)
    if isinstance(costs, MeasuredCosts):
        size = micro_batch_sizes(job.row.batch, job.row.chunks)[0]
        costs.prepare([(size, threads)], concurrent=False)
    weights, cuts, _ = search.weights(job.row.chunks, job.row.checkpoint, threads)
    balance = solve_blocks(weights.device, stages, cuts, cuts, host=weights.host)
    assert balance is not None
    slowest = block_cost(weights.device, balance, cuts, cuts, weights.host)
    spread = max(slowest) / max(1e-12, min(slowest))
    how = f"planned on {','.join(devices[:stages])} from {costs.description}: stages within {spread - 1:.0%}"
    return tuple(balance), how


def resolve_planned(job: jobs.Job, costs: Optional[Costs] = None) -> Tuple[jobs.Job, str]:
    """``job`` with its ``balance: planned`` chosen for its devices (timed here unless ``costs`` are given).

    The :data:`~gpipe_bench.jobs.Planner` the command line gives :func:`jobs.resolve`.
    The row keeps ``planned`` so its record says the balance was planned, not published.
    """
    balance, how = planned_balance(job, costs)
    return replace(job, row=replace(job.row, balance=balance)), how


def _size_option(nbytes: float, up: bool = False) -> str:
    """``nbytes`` as --memory-per-device takes it (:func:`parse_size` reads it back); ``up``: rounded up."""
    gib = nbytes / (1 << 30)
    if up:
        gib = math.ceil(gib * 100) / 100
    return f"{gib:.2f}GiB"


def parse_size(value: str) -> int:
    """``24GiB``, ``512MiB``, ``1.5G``, ``2e9``: bytes; one clear error otherwise."""
    text = value.strip().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6}
    units.update({"g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12})
    number = text.rstrip("BbKkMmGgTtIi")
    unit = text[len(number) :].lower()
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):
        size = -1.0
    if not math.isfinite(size) or size <= 0:
        raise HarnessError(
            f"{value!r} is not a memory size; write e.g. 24GiB, 512MiB or 2e9 (bytes)", param="--memory-per-device"
        )
    return int(size)
