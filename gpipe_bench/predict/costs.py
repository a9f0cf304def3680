"""Where a prediction's per-layer seconds come from: a hardware preset's roofline, or timing on this machine.

Why one interface for both: the simulator, the row predictions and the plan
search must not care whether a layer's cost was counted on ``meta`` and put
through a roofline (:class:`HardwareCosts`, nothing runs: any hardware) or
timed on the device at hand (:class:`MeasuredCosts`). Both answer the same
questions: each layer's forward and backward seconds at a micro-batch size
and a thread count (device work and host work apart), what a copy between
two devices costs, and what the step adds outside the cells (the optimizer
step, a partition's gradient accumulation per micro-batch).

Host work is charged per operator launched: on a GPU it is the time the
interpreter spends issuing kernels (it overlaps the device's work); on a CPU
the worker does it before the arithmetic. A measured CPU time includes it, so
:class:`MeasuredCosts` splits the measured time into the two using the
operator counts from :mod:`.count` and the per-operator time measured here.
"""

from __future__ import annotations

import copy
import gc
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .. import precision as precisions
from ..errors import HarnessError
from ..precision import DEFAULT
from .count import ModelCounts, PassCounts, count_named
from .hardware import Hardware, Link, check_precision, load
from .host import HostCosts, measure
from .measured import LayerTimes, contention, intra_op_threads, synchronize, time_layers
from .roofline import check_dtype, launches, pass_seconds
from .simulate import Host, LayerCost

__all__ = ["LayerCost", "Costs", "HardwareCosts", "MeasuredCosts", "op_overhead"]


@dataclass(frozen=True)
class ModelKey:
    """Which model, at which input size, in which precision: what counting and timing are cached by.

    The precision is part of the key because it changes what is counted (autocast's casts,
    half-precision activations) and what is timed: a bf16 row must never reuse fp32 costs.
    """

    name: str
    args: Tuple[Tuple[str, Any], ...]
    input_size: int
    precision: str = DEFAULT

    @staticmethod
    def of(name: str, args: Mapping[str, Any], input_size: int, precision: str = DEFAULT) -> "ModelKey":
        return ModelKey(name, tuple(sorted(args.items())), input_size, precision)


class Costs(ABC):
    """Per-layer costs of one model, and the machine around the devices."""

    #: how the figures were obtained, for the output ("p40 preset, efficiency 0.21 fitted on naive-1=92.539")
    description: str
    host: Host
    #: what the host spends per operator and per cell of our engine, measured here (:mod:`.host`)
    host_costs: HostCosts

    def __init__(self, model: ModelKey, hardware: Hardware) -> None:
        self.model = model
        self.hardware = hardware
        self.counts: ModelCounts = count_named(model.name, dict(model.args), model.input_size, model.precision)

    @abstractmethod
    def layers(self, batch: int, thread_count: int, device: str) -> List[LayerCost]:
        """Every layer's costs at micro-batch size ``batch`` with ``thread_count`` threads (CPU) on ``device``."""

    @abstractmethod
    def link(self, src: str, dst: str) -> Optional[Link]:
        """The copy between two devices (None: nothing moves, as between virtual CPU devices)."""

    @abstractmethod
    def update(self, params: int, tensors: int, device: str, thread_count: int, kind: str) -> Tuple[float, float]:
        """(host, device) seconds of a pass over ``params`` parameters in ``tensors`` tensors.

        ``kind``: ``'optimizer'`` (plain SGD: read the weight and its gradient, write the weight)
        or ``'accumulate'`` (add a micro-batch's gradients into the running sum).
        """

    @property
    def device_type(self) -> str:
        """'cuda' or 'cpu': what the devices of a prediction are."""
        return self.hardware.device_type

    def process_link(self) -> Optional[Link]:
        """The link between two CPU processes (gloo over TCP on one host), when the preset has one."""
        return self.hardware.links.get("gloo")

    def rank_devices(self, processes: int) -> List[str]:
        """The device of each rank of a launch: a GPU each, or the host's CPU shared by every rank."""
        return [f"cuda:{r}" if self.device_type == "cuda" else "cpu" for r in range(processes)]

    def rank_link(self, src: str, dst: str) -> Optional[Link]:
        """The copy between two ranks on ``src`` and ``dst``: NCCL over the GPUs' link, else gloo between processes."""
        if src.startswith("cuda") and dst.startswith("cuda"):
            return self.link(src, dst)
        return self.process_link()

    def cell_host(self, engine: str = "gpipe-bench") -> Tuple[float, float]:
        """(forward, backward) host seconds ``engine`` adds per cell beyond its operators (:mod:`.host`)."""
        return self.host_costs.per_cell(engine)

    def boundary_bytes(self, cut: int, batch: int) -> int:
        """Bytes crossing a partition boundary before layer ``cut`` (its output and skips crossing it)."""
        return self.counts.boundary_bytes(cut).at(batch)


class HardwareCosts(Costs):
    """Counted on ``meta``, turned into device seconds by ``hardware``'s measured rates (:mod:`.roofline`).

    Host seconds per operator are measured on this machine (:mod:`.host`), scaled
    by ``host_speed`` (the target host's speed per core against this one's), plus
    the preset's kernel launch. ``efficiency`` divides device time alone: the one
    calibration ``--calibrate`` fits (1.0: none). ``channels_last``: the model's
    tensors are NHWC (its tensor-core convolutions pay no transposes).

    The model's precision (``model.precision``) is counted (autocast's casts and
    half-precision activations, :mod:`.count`) and priced at its units' peaks
    (:meth:`.hardware.Hardware.unit`); a preset that cannot run it is refused.
    """

    def __init__(
        self,
        model: ModelKey,
        hardware: Hardware,
        efficiency: float = 1.0,
        fitted: str = "",
        host_speed: float = 1.0,
        host_costs: Optional[HostCosts] = None,
        channels_last: bool = False,
    ) -> None:
        check_precision(hardware, model.precision)
        super().__init__(model, hardware)
        check_dtype(self.counts.dtype)
        self.channels_last = channels_last
        if not (host_speed > 0 and host_speed == host_speed):
            raise HarnessError(f"--host-speed {host_speed!r} is not a positive factor; e.g. 1.5 for a faster host")
        self.efficiency = efficiency
        cores = float(hardware.cores or (os.cpu_count() or 1))
        self.host = Host(cores=cores, threads=int(cores))
        self.host_costs = (host_costs or measure()).scaled(host_speed)
        self.description = f"{hardware.name} preset" + (
            f", efficiency {efficiency:.3f} fitted on {fitted}" if fitted else ""
        )
        self.description += f"; {self.host_costs.describe()}"
        if hardware.kind != "cpu":
            self.description += f" + {hardware.launch * 1e6:.0f} µs per kernel launch"
        self._cache: Dict[Tuple[int, int], List[LayerCost]] = {}

    def _host(self, counts: PassCounts, direction: str) -> float:
        """Host seconds of one pass: its operators at the measured cost, each with the preset's launch."""
        return launches(counts) * (self.host_costs.per_operator(direction) + self.hardware.launch)

    def layers(self, batch: int, thread_count: int, device: str) -> List[LayerCost]:
        key = (batch, thread_count)
        if key not in self._cache:
            share = self._share(thread_count)
            out = []
            for layer in self.counts.at(batch):
                forward = self._device(layer.forward) / share
                forward_host = self._host(layer.forward, "forward")
                nograd_host = self._host(layer.forward, "nograd")
                whole = forward + forward_host
                out.append(
                    LayerCost(
                        forward=forward,
                        backward=self._device(layer.backward) / share,
                        forward_host=forward_host,
                        backward_host=self._host(layer.backward, "backward"),
                        # Without autograd the host records nothing: the device's work is the same.
                        nograd=(forward + nograd_host) / whole if whole > 0 else 1.0,
                    )
                )
            self._cache[key] = out
        return self._cache[key]

    def _device(self, counts: PassCounts) -> float:
        """Device seconds of one pass in the model's precision and layout."""
        return pass_seconds(counts, self.hardware, self.efficiency, self.model.precision, self.channels_last)

    def _share(self, thread_count: int) -> float:
        """The share of the device's peak a worker gets: a CPU's threads of its cores; a GPU is whole."""
        if self.hardware.kind != "cpu":
            return 1.0
        return min(1.0, thread_count / self.host.cores)

    def link(self, src: str, dst: str) -> Optional[Link]:
        return _link(self.hardware, src, dst)

    def update(self, params: int, tensors: int, device: str, thread_count: int, kind: str) -> Tuple[float, float]:
        nbytes = 12 * params  # read a, read b, write a: float32
        device_s = nbytes / (self.hardware.memory_bandwidth * self.efficiency * self._share(thread_count))
        issued = _launches(tensors, device, kind)
        return issued * (self.host_costs.per_operator("nograd") + self.hardware.launch), device_s


def _launches(tensors: int, device: str, kind: str) -> int:
    """Operators a pass over ``tensors`` tensors launches.

    Gradient accumulation uses multi-tensor adds (a few launches); PyTorch's SGD
    uses them on CUDA and one operator per tensor on a CPU.
    """
    if kind == "accumulate" or device.startswith("cuda"):
        return max(1, -(-tensors // 64))
    return tensors


def _link(hardware: Hardware, src: str, dst: str) -> Optional[Link]:
    """The copy between two devices of our engine: none between virtual CPU devices (they share the host's
    memory: the engine hands the tensor over), PCIe between a GPU and the host, else the preset's default."""
    a, b = torch.device(src), torch.device(dst)
    if src == dst or (a.type == "cpu" and b.type == "cpu"):
        return None
    if a.type != b.type:
        return hardware.links.get("pcie") or hardware.link()
    return hardware.link()


# -- measured ---------------------------------------------------------------------------------------------------


def _release(device: torch.device) -> None:
    """Give the memory a timing freed back to a GPU: the caching allocator would otherwise hold it for the process."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def op_overhead(samples: int = 2000, device: torch.device = torch.device("cpu")) -> float:
    """Seconds per operator launched on ``device``: the median of timed batches of tiny adds.

    On a GPU an operator's host time is its launch, which is what a prediction on
    that GPU charges per operator; a CPU tensor's add would time the CPU kernel
    instead. Each batch starts and ends with the device idle, so its queue holds
    no earlier work and every launch of the batch is counted.
    """
    x = torch.zeros(1, device=device)
    times = []
    for _ in range(7):
        synchronize(device)
        tick = time.perf_counter()
        for _ in range(samples):
            x.add_(1.0)
        synchronize(device)
        times.append((time.perf_counter() - tick) / samples)
    del x
    _release(device)
    times.sort()
    return times[len(times) // 2]


class MeasuredCosts(Costs):
    """Timed on ``device`` (this machine), layer by layer, at each row's micro-batch size and thread count.

    In the model's precision: under bf16/fp16 each forward is timed under autocast
    (:func:`gpipe_bench.precision.forward_pass`), as the engine runs a cell.
    """

    @classmethod
    def here(cls, model: ModelKey, rounds: int = 3) -> "MeasuredCosts":
        """Timed on this machine's device (its GPU if it has one, else the host), with the preset that
        prices what is not timed (copies between devices, processes): ``h100`` for a GPU, ``epyc-2vcpu`` (the
        developers' CPU, whose links were measured: a thread hand-off, gloo over loopback) for the host."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model, device, load("epyc-2vcpu" if device == "cpu" else "h100"), rounds)

    def __init__(self, model: ModelKey, device: str, hardware: Hardware, rounds: int = 3) -> None:
        self.device = torch.device(device)
        # A GPU is asked whether it has bf16 only for a bf16 row (the question initialises CUDA).
        bf16 = self.device.type != "cuda" or model.precision != "bf16" or torch.cuda.is_bf16_supported()
        precisions.check(model.precision, self.device.type, bf16, device=f"this machine's {self.device.type}")
        super().__init__(model, hardware)  # the preset gives copies between devices and processes; cells are timed
        self.rounds = rounds
        self.overhead = op_overhead(device=self.device)
        self.host_costs = measure()
        cores = float(torch.get_num_threads())
        self.host = Host(cores=cores, threads=int(cores))
        self.description = f"measured on this machine ({device}, {self.overhead * 1e6:.1f} µs per operator)"
        self._times: Dict[Tuple[int, int], LayerTimes] = {}
        #: scale every untimed size from the nearest timed one (see :meth:`_scaled_from`)
        self.affine = False
        #: time each size's fixed part too (needed to scale sizes; a single-size use may skip it)
        self.fixed = True
        self._update: Dict[Tuple[str, int], float] = {}

    @property
    def device_type(self) -> str:
        return self.device.type

    def _scaled_from(self, batch: int, thread_count: int) -> Optional[int]:
        """The timed size ``batch`` is scaled from instead of being timed, or None (time it).

        A smaller last micro-batch (10 in 4 chunks: 3, 3, 3, 1) is scaled from the
        main size. With :attr:`affine` (the planner, which weighs many sizes), any
        size is scaled from the nearest one timed: each layer's time is its fixed
        part plus a part proportional to the batch.
        """
        near = [b for (b, t) in self._times if t == thread_count]
        if not near:
            return None
        if self.affine:
            return min(near, key=lambda b: (abs(b - batch), -b))
        return min(near) if min(near) > batch else None

    def _timed(self, batch: int, thread_count: int) -> LayerTimes:
        key = (batch, thread_count)
        if key not in self._times:
            source = self._scaled_from(batch, thread_count)
            if source is not None:
                return self._times[(source, thread_count)].scaled(batch)
            self._times[key] = _time_model(self.model, batch, self.device, thread_count, self.rounds, self.fixed)
        return self._times[key]

    def prepare(
        self,
        sizes: Sequence[Tuple[int, int]],
        progress: Callable[[str], None] = lambda line: None,
        concurrent: bool = True,
    ) -> None:
        """Time every (batch, threads) pair now, largest batch first (smaller last pieces are then scaled).

        ``concurrent``: whether any row runs CPU workers side by side (several micro-batches on several
        workers); only then is the contention between them measured.
        """
        for batch, thread_count in sorted(set(sizes), key=lambda s: (-s[0], s[1])):
            if (batch, thread_count) not in self._times and self._scaled_from(batch, thread_count) is None:
                progress(f"timing every layer of {self.model.name} at micro-batch {batch}, {thread_count} thread(s)")
            self._timed(batch, thread_count)
        shared = [(b, t) for b, t in sizes if t < self.host.threads]
        if concurrent and shared and self.device.type == "cpu" and self.host.contention == 0.0:
            batch, thread_count = max(shared)
            workers = max(2, self.host.threads // thread_count)
            progress(f"timing {workers} workers of {thread_count} thread(s) at once against one alone")
            sample = torch.rand(batch, 3, self.model.input_size, self.model.input_size)
            slower = contention(_model(self.model), sample, thread_count, workers, 2, self.model.precision)
            self.host = replace(self.host, contention=slower)
            self.description += f", {slower:.0%} slower per worker while {workers} compute at once"

    def layers(self, batch: int, thread_count: int, device: str) -> List[LayerCost]:
        """Timed seconds, split into host work (the fixed part per call) and the rest.

        Where the fixed part could not be measured (a micro-batch of 3 or less), the
        host part is the layer's operator count times the time of a bare operator.
        """
        timed = self._timed(batch, thread_count)
        fixed_f = timed.forward_fixed or [layer.forward.launches * self.overhead for layer in self.counts.at(batch)]
        fixed_b = timed.backward_fixed or [layer.backward.launches * self.overhead for layer in self.counts.at(batch)]
        nograd = timed.nograd or [1.0] * len(timed.forward)
        out = []
        for f, b, hf, hb, n in zip(timed.forward, timed.backward, fixed_f, fixed_b, nograd):
            hf, hb = min(f, hf), min(b, hb)
            out.append(LayerCost(forward=f - hf, backward=b - hb, forward_host=hf, backward_host=hb, nograd=n))
        return out

    def link(self, src: str, dst: str) -> Optional[Link]:
        return _link(self.hardware, src, dst)

    def update(self, params: int, tensors: int, device: str, thread_count: int, kind: str) -> Tuple[float, float]:
        key = (kind, thread_count)
        if key not in self._update:
            self._update[key] = _time_update(kind, thread_count, device=self.device)
        launches = _launches(tensors, device, kind)
        host = launches * self.overhead
        return host, self._update[key] * params


def _time_update(
    kind: str, thread_count: int, numel: int = 1 << 22, device: torch.device = torch.device("cpu")
) -> float:
    """Seconds per parameter of an SGD step or a gradient accumulation over a 4M-element tensor on ``device``.

    The tensors live where the parameters will (a GPU's memory bandwidth, not the host's),
    and the GPU's own time is taken (:func:`_device_seconds`); the best of five passes.
    """
    a, g = torch.zeros(numel, device=device), torch.ones(numel, device=device)
    with intra_op_threads(thread_count):
        best = min(_device_seconds(partial(_update_pass, kind, a, g), device) for _ in range(5))
    del a, g
    _release(device)
    return best / numel


def _update_pass(kind: str, a: torch.Tensor, g: torch.Tensor) -> None:
    """One pass of ``kind`` over the weight ``a`` and its gradient ``g``."""
    if kind == "optimizer":
        a.add_(g, alpha=-0.1)
    else:
        torch._foreach_add_([a], [g])


def _device_seconds(work: Callable[[], None], device: torch.device) -> float:
    """Seconds ``work`` takes on ``device``: the host's clock on a CPU; CUDA events around it on a GPU.

    A CUDA launch returns before the kernel runs, so the host's clock would time the
    launch alone; the events are recorded on the device's stream around the work,
    after the device has finished everything queued before it.
    """
    if device.type != "cuda":
        tick = time.perf_counter()
        work()
        return time.perf_counter() - tick
    torch.cuda.synchronize(device)
    stream = torch.cuda.current_stream(device)
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record(stream)
    work()
    end.record(stream)
    end.synchronize()
    return float(start.elapsed_time(end)) / 1000.0  # milliseconds


@lru_cache(maxsize=32)
def _model(key: ModelKey) -> torch.nn.Sequential:
    from gpipe_bench import models

    torch.manual_seed(0)
    return models.build(key.name, **dict(key.args))


def _time_model(
    key: ModelKey, batch: int, device: torch.device, thread_count: int, rounds: int, fixed: bool = True
) -> LayerTimes:
    """Every layer of ``key``'s model timed on ``device`` at micro-batch ``batch``.

    :func:`time_layers` moves the model it is given to ``device``, in place. The
    cached model is the host's, shared by every timing (and the contention
    measurement) of the process: a GPU times a copy of it, which is freed with
    the memory the timing used once the figures are taken.
    """
    sample = torch.rand(batch, 3, key.input_size, key.input_size)
    if device.type == "cpu":
        return time_layers(_model(key), sample, device, thread_count, rounds, fixed, key.precision)
    model = copy.deepcopy(_model(key))
    try:
        return time_layers(model, sample, device, thread_count, rounds, fixed, key.precision)
    finally:
        del model, sample
        _release(device)
