"""Predict peak activation memory per device without running the model: meta profiles + the schedule.

Why: the published table's last row needs eight 24 GB cards. A user sizing
such a model, or checking a balance, should get the per-device figure on a
laptop. Two steps, both cheap:

1. **Profile each partition on ``meta``** (shapes only, no memory), once per
   micro-batch size, with the same meter the CPU measurement uses
   (:class:`~gpipe_bench.memory.tracker.TensorMemory`): what a checkpointed
   (no-grad) forward allocates at its peak and leaves behind (the output), what
   a full forward keeps for the backward (saved activations and output), and
   what the backward adds at its peak (gradients of activations, of the input,
   of the parameters).
2. **Replay the engine's schedule** (:mod:`gpipe_bench.pipe.schedule`, the same
   functions the engine runs) on those numbers, clock by clock, with the
   engine's lifetimes: a checkpointed micro-batch keeps only its boundary
   tensors until its backward; one micro-batch at a time is recomputed, one
   clock before its gradient arrives; an input gradient lives until the
   previous partition has used it; the first micro-batch's parameter
   gradients are kept aside until the second is added to them (the sum
   becomes ``.grad``, which is model memory, not activation memory).

Cross-device releases inside a clock (partition ``j + 1`` dropping the input
it shares with ``j``) are applied at the end of the clock: concurrent devices
may release in either order, so the prediction takes the later one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from gpipe_bench import models
from gpipe_bench.devices import memory_slots
from gpipe_bench.jobs import Job
from gpipe_bench.metakernels import FastMeta
from gpipe_bench.perf import checkpoint_stop, micro_batch_sizes, split
from gpipe_bench.pipe.balance import balance_by_size
from gpipe_bench.pipe.microbatch import Tensors, as_tuple, unpack
from gpipe_bench.pipe.schedule import backward_steps, forward_steps
from gpipe_bench.pipe.skip.tracker import ReplayingTracker, use_skip_tracker

from .tracker import TensorMemory, storage_key

__all__ = [
    "CellCost",
    "Prediction",
    "profile_partition",
    "profile",
    "simulate",
    "simulate_plain",
    "nbytes",
    "predict_pipeline",
    "predict_plain",
    "layer_held",
    "find_balance",
    "predict_job",
]


@dataclass(frozen=True)
class CellCost:
    """What one micro-batch costs on one partition, in bytes (activations only)."""

    out: int  # the partition's output
    nograd_peak: int  # peak of a no-grad (checkpointed) forward, above what was held before it
    held: int  # left by a full forward: saved activations and the output
    grad_peak: int  # peak of a full forward (or a recompute), above what was held before it
    bwd_peak: int  # peak of the backward above the held activations, parameter gradients included
    bwd_peak_no_param_grads: int  # the same with parameter gradients left out (they become .grad)
    grad_in: int  # the input's gradient, kept until the previous partition has used it
    param_grads: int  # one set of this partition's parameter gradients


@dataclass
class Prediction:
    """Peak activation bytes per device, and where in the step each peak falls."""

    per_device: List[int]
    when: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.per_device)


def nbytes(tensors: Sequence[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: Dict[int, int] = {}
    for t in tensors:
        seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _leaves(inputs: Tensors, requires_grad: bool) -> Tensors:
    return tuple(t.detach().requires_grad_(requires_grad and t.is_floating_point()) for t in inputs)


def profile_partition(
    partition: nn.Module, inputs: Tensors, atomic: bool, *, first: bool
) -> Tuple[CellCost, Tensors, bool]:
    """Profile one cell of ``partition`` on ``inputs`` (meta tensors); also return its output for the next one.

    ``first``: the partition takes the model's input, which needs no gradient.
    """
    params = [p for p in partition.parameters() if p.requires_grad]
    meter = TensorMemory()
    with meter:
        with torch.no_grad():
            out = partition(unpack(_leaves(inputs, False), atomic))
        outputs, out_atomic = as_tuple(out)
        nograd = meter.curves().get(0)
        out_bytes = nbytes(outputs)
        del out, outputs

        start = meter.mark()
        leaves = _leaves(inputs, not first)
        with torch.enable_grad():
            out = partition(unpack(leaves, atomic))
        outputs, out_atomic = as_tuple(out)
        forward = meter.curves(since=start).get(0)
        held = forward.final if forward else 0
        with meter.charge(1):  # the gradient arriving from the next partition is not this one's
            grad_outputs = [torch.ones_like(t) if t.requires_grad else None for t in outputs]
        start = meter.mark()
        pairs = [(t, g) for t, g in zip(outputs, grad_outputs) if g is not None]
        wrt = [t for t in leaves if t.requires_grad] + params
        grads: Sequence[Optional[Tensor]] = ()
        if pairs and wrt:
            grads = torch.autograd.grad([t for t, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        n_in = sum(1 for t in leaves if t.requires_grad)
        grad_in = nbytes([g for g in grads[:n_in] if g is not None])
        param_grads = [g for g in grads[n_in:] if g is not None]
        backward = meter.curves(since=start).get(0)
        meter.exclude(param_grads)
        backward_np = meter.curves(since=start).get(0)
        pgrad_bytes = nbytes(param_grads)
        next_inputs = tuple(t.detach() for t in outputs)
        del out, outputs, grads, param_grads, pairs, grad_outputs, leaves

    def above(curve_peak: int) -> int:
        return max(0, curve_peak - held)

    return (
        CellCost(
            out=out_bytes,
            nograd_peak=nograd.peak if nograd else 0,
            held=held,
            grad_peak=forward.peak if forward else 0,
            bwd_peak=above(backward.peak) if backward else 0,
            bwd_peak_no_param_grads=above(backward_np.peak) if backward_np else 0,
            grad_in=grad_in,
            param_grads=pgrad_bytes,
        ),
        next_inputs,
        out_atomic,
    )


def profile(partitions: Sequence[nn.Module], sample: Tensors, atomic: bool) -> List[CellCost]:
    """:func:`profile_partition` along the pipeline for one micro-batch ``sample`` (on ``meta``)."""
    costs: List[CellCost] = []
    inputs, in_atomic = sample, atomic
    # Each partition runs twice (no-grad, then with grad): a skip crossing a boundary is popped twice.
    # The engine hands it over; its bytes are not charged here.
    with use_skip_tracker(ReplayingTracker()):
        for j, partition in enumerate(partitions):
            cost, inputs, in_atomic = profile_partition(partition, inputs, in_atomic, first=j == 0)
            costs.append(cost)
    return costs


def layer_held(model: nn.Sequential, sample: Tensor) -> Tuple[List[int], List[int]]:
    """Per layer: what it adds to the bytes a forward with autograd keeps, and its output's bytes (one ``meta`` pass).

    The planner weighs every contiguous block of layers; profiling each block
    (:func:`profile`) would take a pass per block. Instead the whole model runs
    once and the meter is read after every layer: the bytes a block
    ``[s, e)`` keeps for its backward are the live bytes after layer ``e - 1``
    less those after layer ``s - 1``, a difference of prefix sums. A layer's
    figure can be negative (it frees an input it did not save).
    """
    meter = TensorMemory()
    marks: List[int] = []
    outs: List[int] = []
    with meter, torch.enable_grad():
        start = meter.mark()
        x: Any = sample
        for layer in model.children():
            x = layer(x)
            marks.append(meter.mark())
            outs.append(nbytes(as_tuple(x)[0]))
        live = meter.live_at([start, *marks])
        del x
    return [b - a for a, b in zip(live, live[1:])], outs


class _Slots:
    """Live bytes and peaks per device, addressed by partition, with releases deferred to the end of a clock."""

    def __init__(self, devices: int, slot: Sequence[int]) -> None:
        self.slot = list(slot)
        self.live_ = [0] * devices
        self.peak = [0] * devices
        self.when = [""] * devices
        self.later: List[Tuple[int, int]] = []

    def at(self, j: int, transient: int, what: str) -> None:
        d = self.slot[j]
        if self.live_[d] + transient > self.peak[d]:
            self.peak[d], self.when[d] = self.live_[d] + transient, f"{what} on partition {j}"

    def add(self, j: int, nbytes: int, what: str) -> None:
        self.live_[self.slot[j]] += nbytes
        self.at(j, 0, what)

    def free(self, j: int, nbytes: int) -> None:
        self.live_[self.slot[j]] -= nbytes

    def end_of_clock(self) -> None:
        for j, nbytes in self.later:
            self.free(j, nbytes)
        self.later.clear()


def simulate(
    costs: Sequence[Sequence[CellCost]],
    checkpoint_stop: int,
    *,
    input_bytes: int = 0,
    head_bytes: int = 0,
    optimizer_temp: Optional[Sequence[int]] = None,
    slots: Optional[Sequence[int]] = None,
) -> Prediction:
    """Replay the fill-drain schedule over ``costs[i][j]`` (micro-batch ``i``, partition ``j``).

    ``input_bytes`` (the mini-batch) is held on the first device throughout;
    ``head_bytes`` (the joined output and its gradient, the labels) on the
    last; ``optimizer_temp[j]`` is the optimizer step's scratch of partition
    ``j``. ``slots[j]`` is the device partition ``j`` runs on, when partitions
    share devices (default: one device each); the result has one entry per device.
    """
    m, n = len(costs), len(costs[0])
    slot = list(slots) if slots is not None else list(range(n))
    dev = _Slots(max(slot) + 1, slot)
    dev.add(0, input_bytes, "input")
    for clock in forward_steps(m, n):
        for step in clock:
            i, j = step.i, step.j
            c = costs[i][j]
            if i < checkpoint_stop:
                dev.at(j, c.nograd_peak, f"forward {i} (checkpointed)")
                dev.add(j, c.out, f"forward {i} (checkpointed)")
            else:
                dev.at(j, c.grad_peak, f"forward {i}")
                dev.add(j, c.held, f"forward {i}")
    dev.add(n - 1, head_bytes, "loss")

    done = [0] * n
    for clock in backward_steps(m, n, lambda i: i < checkpoint_stop):
        for step in clock:
            i, j = step.i, step.j
            c = costs[i][j]
            if step.kind == "recompute":
                dev.at(j, c.grad_peak, f"recompute {i}")
                dev.add(j, c.held, f"recompute {i}")
                if j == n - 1:
                    dev.free(j, c.out)  # the recomputed output replaces the checkpointed one
                continue
            bwd = c.bwd_peak if m > 1 else c.bwd_peak_no_param_grads
            dev.at(j, bwd, f"backward {i}")
            dev.free(j, c.held)
            if j > 0:
                dev.free(j, -c.grad_in)
            if m > 1 and done[j] == 0:
                dev.free(j, -c.param_grads)  # the first gradients, until the second is added
            elif m > 1 and done[j] == 1:
                dev.free(j, costs[m - 1][j].param_grads)
            done[j] += 1
            if j < n - 1:
                dev.later.append((j + 1, costs[i][j + 1].grad_in))
            if j > 0 and i < checkpoint_stop:
                dev.later.append((j - 1, costs[i][j - 1].out))  # the checkpointed output it took as input
        dev.end_of_clock()
    for j in range(n):
        dev.at(j, (optimizer_temp or [0] * n)[j], "optimizer step")
    return Prediction(per_device=dev.peak, when=dev.when)


def simulate_plain(cost: CellCost, *, input_bytes: int = 0, head_bytes: int = 0, optimizer_temp: int = 0) -> Prediction:
    """The plain model on one device: one full forward, the backward, the optimizer step."""
    dev = _Slots(1, [0])
    dev.add(0, input_bytes, "input")
    dev.at(0, cost.grad_peak, "forward")
    dev.add(0, cost.held + head_bytes, "forward")
    dev.at(0, cost.bwd_peak_no_param_grads, "backward")
    dev.free(0, cost.held)
    dev.at(0, optimizer_temp, "optimizer step")
    return Prediction(per_device=dev.peak, when=dev.when)


def predict_pipeline(
    model: nn.Sequential,
    balance: Sequence[int],
    sample: Tensor,
    *,
    chunks: int,
    checkpoint: str,
    slots: Optional[Sequence[int]] = None,
    head_bytes: int = 0,
    optimizer_temp: Optional[Sequence[int]] = None,
    cache: Optional[Dict[Tuple[Tuple[int, ...], int], List[CellCost]]] = None,
) -> Prediction:
    """Peak activation bytes per device of a GPipe training step of ``model`` (on ``meta``) on ``sample``.

    ``sample`` is the whole mini-batch (a ``meta`` tensor); it counts on the first device.
    ``cache``: profiles by (balance, micro-batch size), kept by a caller that predicts many
    configurations of one model (the planner: checkpoint modes share them).
    """
    parts = split(model, balance)
    sizes = micro_batch_sizes(sample.size(0), chunks)
    cache = cache if cache is not None else {}
    for size in set(sizes):
        if (tuple(balance), size) not in cache:
            cache[(tuple(balance), size)] = profile(parts, (sample[:size],), True)
    by_size = {size: cache[(tuple(balance), size)] for size in set(sizes)}
    return simulate(
        [by_size[size] for size in sizes],
        checkpoint_stop(checkpoint, chunks),
        input_bytes=nbytes([sample]),
        head_bytes=head_bytes,
        optimizer_temp=optimizer_temp,
        slots=slots,
    )


def predict_plain(model: nn.Module, sample: Tensor, *, head_bytes: int = 0, optimizer_temp: int = 0) -> Prediction:
    """Peak activation bytes of a training step of the plain ``model`` (on ``meta``) on ``sample``."""
    cost = profile([model], (sample,), True)[0]
    return simulate_plain(cost, input_bytes=nbytes([sample]), head_bytes=head_bytes, optimizer_temp=optimizer_temp)


# -- a resolved row ------------------------------------------------------------------------------------------------


def _meta_model(job: Job) -> nn.Sequential:
    return models.build_meta(job.model_name, **job.model_args)


def find_balance(job: Job, model: Optional[nn.Sequential] = None) -> Tuple[int, ...]:
    """The row's balance, or one found by ``balance_by_size`` on ``meta`` when the config leaves it null.

    ``model``: the row's model on ``meta``, when the caller has built it already.
    """
    if job.row.balance is not None:
        return tuple(job.row.balance)
    model = model if model is not None else _meta_model(job)
    if not job.split or job.row.devices == 1:
        return (len(model),)
    s = job.settings
    sample = torch.empty(job.row.batch, 3, s.input_size, s.input_size, device="meta")
    copies = job.memory_settings.parameter_copies
    return tuple(
        balance_by_size(job.row.devices, model, sample, chunks=job.row.chunks, param_scale=copies, device="meta")
    )


def _optimizer_temp(part: nn.Module, device: str) -> int:
    """Scratch of an RMSprop step: one buffer per parameter tensor, all at once where PyTorch uses foreach (CUDA)."""
    sizes = [p.numel() * p.element_size() for p in part.parameters()]
    if not sizes:
        return 0
    return sum(sizes) if device.startswith("cuda") else max(sizes)


def predict_job(
    job: Job, balance: Sequence[int], model: Optional[nn.Sequential] = None, cache: Optional[Dict[Any, Any]] = None
) -> Prediction:
    """Peak activation bytes per device for the row, from ``meta`` (see :mod:`gpipe_bench.memory.predict`).

    ``cache``: partition profiles kept across calls (:func:`~gpipe_bench.memory.predict.predict_pipeline`).
    """
    row, s = job.row, job.settings
    model = model if model is not None else _meta_model(job)
    model.train()
    sample = torch.empty(row.batch, 3, s.input_size, s.input_size, device="meta")
    with torch.device("meta"), FastMeta():
        out = model(sample[:1])
    head = 2 * nbytes(as_tuple(out)[0]) * row.batch + row.batch * 8  # joined output, its gradient, the labels
    if not job.split:
        return predict_plain(model, sample, head_bytes=head, optimizer_temp=_optimizer_temp(model, job.devices[0]))
    parts = split(model, balance)
    devices = list(job.devices)
    _, slots = memory_slots(devices)
    temps = [_optimizer_temp(p, d) for p, d in zip(parts, devices)]
    return predict_pipeline(
        model,
        balance,
        sample,
        chunks=row.chunks,
        checkpoint=row.checkpoint,
        slots=slots,
        head_bytes=head,
        optimizer_temp=temps,
        cache=cache,
    )
