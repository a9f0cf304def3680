"""Engine micro-benchmark: plain model vs our GPipe vs torchgpipe 0.0.7, one process.

Why it exists
-------------
``gpipe_bench.pipe.GPipe`` has to earn its place twice. First, on one device it
must cost (almost) nothing over the plain model doing the same work, i.e.
gradient accumulation over the same micro-batches, and it must be no slower than
torchgpipe 0.0.7, the engine it replaces. Second, across devices the pipeline
must actually overlap its partitions: on two virtual CPU devices (``cpu:0``,
``cpu:1``, one worker thread each) ``chunks=M`` must beat ``chunks=1`` (naive
model parallelism) by a clear margin. This is the check behind
``make bench-engine`` (CPU) and the timing step of ``make gpu-check``
(``--device cuda``).

What it runs
------------
One model is built once; every variant trains a fresh deep copy of it (same
weights) on the same fixed batch (``torch.rand`` inputs, ``randint`` labels,
cross-entropy, SGD lr 0.1). One *training step* is zero_grad, forward,
backward and one optimizer step over the whole batch.

(a)  plain ``nn.Sequential``, gradient accumulation: the batch is split into M
     parts with ``torch.chunk``, each part does forward + backward (loss scaled
     by its share of the batch), then one optimizer step.
(b)  our GPipe, two halves on one device (``['cpu', 'cpu']``: one worker for
     both), ``chunks=M``, ``checkpoint='never'``.
(c)  torchgpipe 0.0.7 with identical settings.
(d0) our GPipe on ``['cpu:0', 'cpu:1']``, ``chunks=1``: naive model parallelism.
(d)  our GPipe on ``['cpu:0', 'cpu:1']``, ``chunks=M``: the pipeline.
(e)  our GPipe as (b) but ``checkpoint='except_last'``: informational, shows the
     cost of recomputation.

With ``--device cuda`` only (a), (b), (c) run, on ``cuda:0`` (GPipe with
``['cuda:0', 'cuda:0']``), a ResNet-sized stack, ``torch.cuda.synchronize()``
around every timed step.

Measurement: one warm-up round of every variant, then ``--repeats`` rounds,
round-robin over the variants (each round starting one variant later than the
previous, so no variant always follows the same neighbour). Interleaving means
slow drifts of the machine (thermal, other processes) hit all variants alike.

How to read it
--------------
The first table gives, per variant, the median seconds per training step and
the spread (min-max) over the repeats; a wide spread means a noisy machine
(the script prints a warning when a row's max exceeds its min by more than 25 %;
the 1-min load average at start is printed too). On a 2-core host another busy
process is enough to make 2-thread steps several times slower (OpenMP threads
wait on a descheduled peer), so rerun with more ``--repeats`` on an
idle machine before believing a ratio near its target. The second table gives
the ratios with their targets:

* (b)/(a) throughput = t(a) / t(b) >= 0.95: the engine's own overhead on one
  device is at most ~5 %.
* (b)/(c) throughput = t(c) / t(b) >= 1.0: not slower than torchgpipe.
* (d)/(d0) speedup = t(d0) / t(d) >= 1.4 (defined for a 2-core host): pipeline
  overlap. Beside it, the ideal fill-drain speedup of two balanced stages,
  2M/(M+1), and how much of it was reached.
* (e)/(b) is information only: the price of ``checkpoint='except_last'``.

The host-bound suite (``--suite host``, run by default after the one above)
------------------------------------------------------------------------------
On a current GPU a micro-batch of 16 finishes on the device faster than the
host can issue it, so what the engine adds to eager PyTorch's host time per
cell (micro-batch x partition) is what limits pipeline rows with small
micro-batches. It is measured where the host is the whole cost: 369 layers
(122 blocks of Conv2d(16, 16, 3) / BatchNorm2d / ReLU at 8x8, then pool,
flatten, linear), micro-batches of 2, 32 micro-batches, 8 partitions on one
device, one intra-op thread (set for every variant alike, and printed):

(ha) plain ``nn.Sequential``, gradient accumulation over the 32 micro-batches;
(hb) our GPipe, ``checkpoint='never'``; (hc) torchgpipe 0.0.7, ``'never'``;
(he) our GPipe, ``'except_last'``; (hf) torchgpipe 0.0.7, ``'except_last'``;
and two rows that say what no engine can remove: (hh) the plain model holding
every micro-batch's graph until one backward (a fill-drain pipeline's memory
footprint, which makes the host's allocator and caches slower than in (ha)),
and (hn) the plain model's no-grad forward of the 31 micro-batches that
``'except_last'`` checkpoints (that forward comes on top of the plain step's
work, so ``1 + t(hn)/t(ha)`` is the floor of (he)/(ha) on the machine at hand).

Targets, as step-time ratios in one run: (hb)/(ha) <= 1.05, (he)/(ha) <= 1.35
(the recompute itself is about a third of a step), (hb)/(hc) <= 1.0 and
(he)/(hf) <= 1.0; beside each, the time added per cell. With ``--device
cuda`` the same rows run on ``cuda:0`` (``['cuda:0'] * 8``): a host-bound CUDA
workload, where the suite above is GPU-bound and its ratio reads ~1.0 whatever
the engine costs.

Host memory: by default the benchmark fixes glibc's allocator thresholds
(``--malloc steady``) so freed memory stays in the process; see
:func:`steady_host_allocator` for why, and ``--malloc default`` to measure
without it.

Each targeted line says PASS or MISS as measured; nothing is adjusted. The exit
status is 0 whenever the benchmark ran (a MISS is a finding, not a crash).

Example::

    python benchmarks/engine.py --repeats 7 --chunks 8
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, TextIO, Tuple

import torch
import torch.nn.functional as F
from tabulate import tabulate  # type: ignore[import-untyped, unused-ignore]
from torch import nn

from gpipe_bench import hostalloc
from gpipe_bench.environment import cpu_model, usable_cores
from gpipe_bench.pipe import GPipe

__all__ = ["Workload", "Variant", "build_model", "build_variants", "measure", "main"]


@dataclass(frozen=True)
class Workload:
    """The model and batch of one benchmark run."""

    channels: int
    blocks: int  # Conv2d/BatchNorm2d/ReLU blocks after the stem block
    spatial: int  # input height = width
    batch: int
    classes: int


# Calibrated by measurement on the development machine (2 vCPUs of an AMD EPYC,
# torch 2.14.1, 2 intra-op threads, 2026-11-28): one plain training step
# (forward + backward + SGD, full batch) of this 24-layer stack took 0.205 s
# (best of 20; median 0.21 s). Neighbours measured there: 34x34 -> 0.18 s,
# 32x32 -> 0.16 s, 48 channels at 32x32 batch 64 -> 0.31 s. Batch 64 gives
# micro-batches of 8 at M=8 and is divisible by every power-of-two --chunks up to 64.
CPU_WORKLOAD = Workload(channels=32, blocks=6, spatial=36, batch=64, classes=10)
# ResNet-sized stack for --device cuda: 256 channels at 56x56 (ResNet's stage-1
# resolution), batch 64, 24 layers.
CUDA_WORKLOAD = Workload(channels=256, blocks=6, spatial=56, batch=64, classes=1000)
# --quick: a seconds-long smoke run of the same code paths.
QUICK_WORKLOAD = Workload(channels=8, blocks=2, spatial=8, batch=16, classes=10)


@dataclass(frozen=True)
class HostBound:
    """The host-bound suite's workload: many tiny layers, small micro-batches, partitions on one device."""

    blocks: int  # Conv2d/BatchNorm2d/ReLU blocks; with pool/flatten/linear, 3 * blocks + 3 layers
    channels: int
    spatial: int
    micro: int  # samples per micro-batch
    chunks: int  # micro-batches
    partitions: int
    threads: int  # intra-op threads, for every variant alike


HOST_BOUND = HostBound(blocks=122, channels=16, spatial=8, micro=2, chunks=32, partitions=8, threads=1)
QUICK_HOST_BOUND = HostBound(blocks=4, channels=8, spatial=8, micro=2, chunks=4, partitions=2, threads=1)
TARGET_HOST_NEVER = 1.05
TARGET_HOST_EXCEPT_LAST = 1.35
TARGET_HOST_VS_TORCHGPIPE = 1.0

DEFAULT_CHUNKS = 8
DEFAULT_REPEATS = 5
LEARNING_RATE = 0.1

TARGET_B_OVER_A = 0.95
TARGET_B_OVER_C = 1.0
TARGET_D_OVER_D0 = 1.4
NOISY_SPREAD = 0.25  # max/min above 1.25 in a row: flag the run as noisy
TORCHGPIPE_MISSING = "not installed: pip install torchgpipe==0.0.7"

Step = Callable[[], None]


def build_model(workload: Workload) -> nn.Sequential:
    """A flat conv stack: stem + ``blocks`` x (Conv2d, BatchNorm2d, ReLU), then pool/flatten/linear."""
    c = workload.channels
    layers: List[nn.Module] = [nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    for _ in range(workload.blocks):
        layers += [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, workload.classes)]
    return nn.Sequential(*layers)


def halves(model: nn.Sequential) -> List[int]:
    """Balance of two partitions with the layers split in half."""
    n = len(model)
    return [n // 2, n - n // 2]


@dataclass
class Variant:
    """One row of the table: a way of doing a training step, and its timings."""

    key: str
    engine: str
    devices: str
    chunks: int
    checkpoint: str
    step: Optional[Step]  # None: the variant cannot run (see ``note``)
    note: str = ""
    # A third-party engine whose failure in warm-up is reported in its row instead of raised.
    fallible: bool = False
    times: List[float] = field(default_factory=list)

    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None


def accumulation_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunks: int) -> Step:
    """(a): split the batch with ``torch.chunk``, forward+backward each part, one SGD step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    parts = list(zip(torch.chunk(x, chunks), torch.chunk(y, chunks)))
    total = x.size(0)

    def step() -> None:
        optimizer.zero_grad()
        for xs, ys in parts:
            # Scaled by its share, the sum of part losses is the full-batch mean loss.
            loss = F.cross_entropy(model(xs), ys) * (xs.size(0) / total)
            torch.autograd.backward(loss)
        optimizer.step()

    return step


def full_batch_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """(b)-(e): one forward of the whole batch through the (pipelined) model, backward, SGD step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def step() -> None:
        optimizer.zero_grad()
        output = model(x)
        loss = F.cross_entropy(output, y.to(output.device))
        torch.autograd.backward(loss)
        optimizer.step()

    return step


def torchgpipe_variant(
    base: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    devices: List[str],
    chunks: int,
    checkpoint: str = "never",
    balance: Optional[List[int]] = None,
) -> Variant:
    """(c): torchgpipe 0.0.7 with the settings of (b), or a row saying why it cannot run."""
    variant = Variant("(c)", "torchgpipe 0.0.7", ", ".join(devices), chunks, checkpoint, None, fallible=True)
    try:
        import torchgpipe  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        variant.note = TORCHGPIPE_MISSING
        return variant
    version = getattr(torchgpipe, "__version__", "?")
    variant.engine = f"torchgpipe {version}"
    try:
        model = torchgpipe.GPipe(
            copy.deepcopy(base),
            balance=balance or halves(base),
            devices=devices,
            chunks=chunks,
            checkpoint=checkpoint,
        )
    except Exception as error:  # noqa: BLE001 - a third-party engine failing on this torch is a result
        variant.note = f"failed: {type(error).__name__}: {error}"[:120]
        return variant
    variant.step = full_batch_step(model, x, y)
    return variant


def build_variants(base: nn.Sequential, x: torch.Tensor, y: torch.Tensor, device: str, chunks: int) -> List[Variant]:
    """Every variant for ``device`` ('cpu' or 'cuda'), each on a fresh deep copy of ``base``."""
    balance = halves(base)
    if device == "cuda":
        one = ["cuda:0", "cuda:0"]
        plain = copy.deepcopy(base).to("cuda:0")
        return [
            Variant(
                "(a)", "nn.Sequential, grad accumulation", "cuda:0", chunks, "-", accumulation_step(plain, x, y, chunks)
            ),
            Variant(
                "(b)",
                "our GPipe",
                ", ".join(one),
                chunks,
                "never",
                full_batch_step(
                    GPipe(copy.deepcopy(base), balance, devices=one, chunks=chunks, checkpoint="never"), x, y
                ),
            ),
            torchgpipe_variant(base, x, y, one, chunks),
        ]

    one = ["cpu", "cpu"]
    two = ["cpu:0", "cpu:1"]

    def ours(devices: List[str], m: int, checkpoint: str) -> Step:
        model = GPipe(copy.deepcopy(base), balance, devices=devices, chunks=m, checkpoint=checkpoint)
        return full_batch_step(model, x, y)

    return [
        Variant(
            "(a)",
            "nn.Sequential, grad accumulation",
            "cpu",
            chunks,
            "-",
            accumulation_step(copy.deepcopy(base), x, y, chunks),
        ),
        Variant("(b)", "our GPipe", ", ".join(one), chunks, "never", ours(one, chunks, "never")),
        torchgpipe_variant(base, x, y, one, chunks),
        Variant("(d0)", "our GPipe, naive model parallel", ", ".join(two), 1, "never", ours(two, 1, "never")),
        Variant("(d)", "our GPipe, pipelined", ", ".join(two), chunks, "never", ours(two, chunks, "never")),
        Variant(
            "(e)",
            "our GPipe [info: recompute]",
            ", ".join(one),
            chunks,
            "except_last",
            ours(one, chunks, "except_last"),
        ),
    ]


def host_bound_model(workload: HostBound) -> nn.Sequential:
    """``blocks`` x (Conv2d, BatchNorm2d, ReLU) without a stem, then pool/flatten/linear to 10 classes."""
    c = workload.channels
    layers: List[nn.Module] = []
    for _ in range(workload.blocks):
        layers += [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


def even_balance(layers: int, partitions: int) -> List[int]:
    """``layers`` over ``partitions`` as evenly as possible, the larger shares first."""
    share, extra = divmod(layers, partitions)
    return [share + (1 if k < extra else 0) for k in range(partitions)]


def held_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunks: int) -> Step:
    """(hh): every micro-batch's forward first, one backward of their summed losses, one SGD step.

    The same arithmetic as (ha), holding every micro-batch's activations until the
    backward as any GPipe must: the part of a pipeline's cost that is its memory
    footprint, not its engine.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    parts = list(zip(torch.chunk(x, chunks), torch.chunk(y, chunks)))
    total = x.size(0)

    def step() -> None:
        optimizer.zero_grad()
        losses = [F.cross_entropy(model(xs), ys) * (xs.size(0) / total) for xs, ys in parts]
        torch.autograd.backward(torch.stack(losses).sum())
        optimizer.step()

    return step


def no_grad_forward(model: nn.Module, x: torch.Tensor, chunks: int) -> Step:
    """(hn): the forward of the ``chunks - 1`` micro-batches 'except_last' checkpoints, without a graph.

    Checkpointing runs that forward on top of the plain step's work (the recompute
    then is the plain step's forward), so ``1 + t(hn) / t(ha)`` is the lowest
    (he)/(ha) any engine can reach on the machine at hand.
    """
    parts = torch.chunk(x, chunks)[: chunks - 1]

    def step() -> None:
        with torch.no_grad():
            for xs in parts:
                model(xs)

    return step


def build_host_variants(workload: HostBound, device: str) -> Tuple[List[Variant], int]:
    """Rows (ha)-(hf) of the host-bound suite on ``device`` ('cpu' or 'cuda'), and the batch size."""
    torch.manual_seed(0)
    base = host_bound_model(workload)
    target = "cuda:0" if device == "cuda" else "cpu"
    batch = workload.micro * workload.chunks
    x = torch.rand(batch, workload.channels, workload.spatial, workload.spatial).to(target)
    y = torch.randint(0, 10, (batch,)).to(target)
    balance = even_balance(len(base), workload.partitions)
    devices = [target] * workload.partitions
    shown = f"{target} x{workload.partitions}"
    m = workload.chunks

    def ours(checkpoint: str) -> Step:
        model = GPipe(copy.deepcopy(base), balance, devices=devices, chunks=m, checkpoint=checkpoint)
        return full_batch_step(model, x, y)

    def theirs(key: str, checkpoint: str) -> Variant:
        variant = torchgpipe_variant(base, x, y, devices, m, checkpoint, balance)
        return Variant(key, variant.engine, shown, m, checkpoint, variant.step, variant.note, fallible=True)

    plain = copy.deepcopy(base).to(target)
    variants = [
        Variant("(ha)", "nn.Sequential, grad accumulation", target, m, "-", accumulation_step(plain, x, y, m)),
        Variant(
            "(hh)",
            "nn.Sequential, every graph held [info]",
            target,
            m,
            "-",
            held_step(copy.deepcopy(base).to(target), x, y, m),
        ),
        Variant(
            "(hn)",
            "nn.Sequential, no-grad forward [info]",
            target,
            m - 1,
            "-",
            no_grad_forward(copy.deepcopy(base).to(target), x, m),
        ),
        Variant("(hb)", "our GPipe", shown, m, "never", ours("never")),
        theirs("(hc)", "never"),
        Variant("(he)", "our GPipe", shown, m, "except_last", ours("except_last")),
        theirs("(hf)", "except_last"),
    ]
    return variants, batch


def host_ratios_table(variants: Sequence[Variant], workload: HostBound) -> str:
    """Step-time ratios of the host-bound suite against their targets, and the time added per cell."""
    t = {v.key: v.median() for v in variants}
    notes = {v.key: v.note for v in variants}
    cells = workload.chunks * workload.partitions
    rows: List[List[str]] = []

    def add(name: str, slow: str, fast: str, target: float) -> None:
        num, den = t.get(slow), t.get(fast)
        if num is None or den is None:
            why = notes.get(slow) or notes.get(fast) or "not measured"
            rows.append([name, "-", f"<= {target:.2f}", "-", f"SKIP ({why})"])
            return
        value = num / den
        added = (num - den) / cells * 1e6
        verdict = "PASS" if value <= target else "MISS"
        rows.append([name, f"{value:.3f}", f"<= {target:.2f}", f"{added:+.0f} us", verdict])

    def info(name: str, value: Optional[float], note: str) -> None:
        rows.append([name, "-" if value is None else f"{value:.3f}", "-", note, "info"])

    add("(hb)/(ha) step time: ours, never, vs plain", "(hb)", "(ha)", TARGET_HOST_NEVER)
    held, plain, floor = t.get("(hh)"), t.get("(ha)"), t.get("(hn)")
    info(
        "(hh)/(ha): every graph held, plain",
        held / plain if held and plain else None,
        "the footprint's share",
    )
    add("(he)/(ha) step time: ours, except_last, vs plain", "(he)", "(ha)", TARGET_HOST_EXCEPT_LAST)
    info(
        "1 + (hn)/(ha): except_last's floor",
        1 + floor / plain if floor and plain else None,
        "no-grad forward",
    )
    add("(hb)/(hc) step time: ours vs torchgpipe, never", "(hb)", "(hc)", TARGET_HOST_VS_TORCHGPIPE)
    add("(he)/(hf) step time: ours vs torchgpipe, except_last", "(he)", "(hf)", TARGET_HOST_VS_TORCHGPIPE)
    headers = ["ratio", "measured", "target", "added per cell", "verdict"]
    return str(tabulate(rows, headers=headers, tablefmt="rst", disable_numparse=True))


def host_bound_description(workload: HostBound) -> str:
    layers = 3 * workload.blocks + 3
    return (
        f"host-bound suite: {layers} layers ({workload.blocks} blocks of Conv2d({workload.channels}, "
        f"{workload.channels}, 3)/BatchNorm2d/ReLU at {workload.spatial}x{workload.spatial}, then pool/flatten/linear), "
        f"{workload.chunks} micro-batches of {workload.micro}, {workload.partitions} partitions on one device, "
        f"{workload.threads} intra-op thread(s) for every variant"
    )


def _time_step(step: Step, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def measure(variants: Sequence[Variant], repeats: int, sync: Callable[[], None], log: Optional[TextIO]) -> None:
    """One warm-up round, then ``repeats`` interleaved rounds; fills ``Variant.times``.

    A ``fallible`` variant that raises in warm-up is dropped, the error kept in its ``note``.
    """
    runnable = [v for v in variants if v.step is not None]
    for v in list(runnable):  # warm-up, not recorded
        assert v.step is not None
        try:
            _time_step(v.step, sync)
        except Exception as error:  # noqa: BLE001 - only for fallible (third-party) variants
            if not v.fallible:
                raise
            v.step, v.note = None, f"failed: {type(error).__name__}: {error}"[:120]
            runnable.remove(v)
    if log is not None:
        print("  warm-up done", file=log, flush=True)
    n = len(runnable)
    for r in range(repeats):
        offset = r % n if n else 0
        for v in runnable[offset:] + runnable[:offset]:
            assert v.step is not None
            v.times.append(_time_step(v.step, sync))
        if log is not None:
            done = ", ".join(f"{v.key} {v.times[-1]:.3f}s" for v in runnable)
            print(f"  round {r + 1}/{repeats} done: {done}", file=log, flush=True)


def _fmt(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds:.4f}"


def results_table(variants: Sequence[Variant], batch: int) -> str:
    rows = []
    for v in variants:
        med = v.median()
        spread = f"{min(v.times):.4f}-{max(v.times):.4f}" if v.times else v.note or "-"
        rate = f"{batch / med:.1f}" if med else "-"
        rows.append([v.key, v.engine, v.devices, v.chunks, v.checkpoint, _fmt(med), spread, rate])
    headers = ["row", "engine", "devices", "chunks", "checkpoint", "median s/step", "spread (min-max)", "samples/s"]
    return str(tabulate(rows, headers=headers, tablefmt="rst", disable_numparse=True))


def _verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "MISS"


def ratios_table(variants: Sequence[Variant], chunks: int, cores: int) -> str:
    t = {v.key: v.median() for v in variants}
    c_note = next((v.note for v in variants if v.key == "(c)"), "")
    rows: List[List[str]] = []

    def add(name: str, slow: str, fast: str, target: Optional[float], skip: str = "") -> None:
        num, den = t.get(slow), t.get(fast)
        if num is None or den is None:
            rows.append(
                [name, "-", f">= {target:.2f}" if target else "-", "-", "-", f"SKIP ({skip or 'not measured'})"]
            )
            return
        value = num / den
        rows.append(
            [
                name,
                f"{value:.3f}",
                f">= {target:.2f}" if target else "-",
                "-",
                "-",
                _verdict(value, target) if target else "info",
            ]
        )

    add("(b)/(a) throughput: our GPipe vs plain", "(a)", "(b)", TARGET_B_OVER_A)
    add("(b)/(c) throughput: our GPipe vs torchgpipe", "(c)", "(b)", TARGET_B_OVER_C, c_note)
    if "(d)" in t:
        ideal = 2 * chunks / (chunks + 1)
        d0, d = t.get("(d0)"), t.get("(d)")
        if d0 is not None and d is not None:
            value = d0 / d
            verdict = _verdict(value, TARGET_D_OVER_D0)
            if cores < 2:
                verdict = f"n/a ({cores} core; needs >= 2)"
            elif ideal < TARGET_D_OVER_D0:
                verdict += f" (ideal {ideal:.2f} < target at chunks={chunks})"
            rows.append(
                [
                    "(d)/(d0) speedup: pipelined vs naive",
                    f"{value:.3f}",
                    f">= {TARGET_D_OVER_D0:.2f}",
                    f"{ideal:.3f}",
                    f"{value / ideal:.3f}",
                    verdict,
                ]
            )
        add("(e)/(b) time: cost of checkpoint='except_last'", "(e)", "(b)", None)
    else:
        rows.append(
            [
                "(d)/(d0) speedup: pipelined vs naive",
                "-",
                f">= {TARGET_D_OVER_D0:.2f}",
                f"{2 * chunks / (chunks + 1):.3f}",
                "-",
                "SKIP (virtual CPU devices only)",
            ]
        )
    headers = ["ratio", "measured", "target", "ideal 2M/(M+1)", "measured/ideal", "verdict"]
    return str(tabulate(rows, headers=headers, tablefmt="rst", disable_numparse=True))


def steady_host_allocator() -> str:
    """The package's steady policy (:mod:`gpipe_bench.hostalloc`), for every variant alike; its description."""
    return hostalloc.apply("steady") + " (--malloc default to measure without)"


def environment(device: str, workload: Workload, chunks: int, repeats: int) -> List[str]:
    cores, total = usable_cores(), os.cpu_count() or 1
    name = torch.cuda.get_device_name(0) if device == "cuda" else cpu_model()
    lines = [
        f"date:     {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"torch:    {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if device == "cuda" else ""),
        f"threads:  {torch.get_num_threads()} (torch.get_num_threads())",
        f"CPUs:     {cores}" + (f" usable of {total}" if cores != total else ""),
        f"device:   {device}: {name}",
        f"workload: {3 * (workload.blocks + 1) + 3} layers, {workload.blocks + 1} conv blocks x {workload.channels} ch at {workload.spatial}x{workload.spatial}, "
        f"batch {workload.batch}, {workload.classes} classes; chunks M={chunks}; "
        f"{repeats} interleaved rounds after 1 warm-up",
    ]
    if hasattr(os, "getloadavg"):
        lines.append(
            f"load:     {os.getloadavg()[0]:.2f} (1-min load average at start; it lags, the spread tells more)"
        )
    return lines


def noise_warning(variants: Sequence[Variant], tolerance: float = NOISY_SPREAD) -> Optional[str]:
    """A warning naming the rows whose max/min exceeds ``1 + tolerance``, or None."""
    noisy = [v.key for v in variants if len(v.times) > 1 and max(v.times) > (1 + tolerance) * min(v.times)]
    if not noisy:
        return None
    return (
        f"warning: spread above {tolerance:.0%} of the minimum in {', '.join(noisy)}: the machine was busy or "
        "unstable; treat the ratios as unreliable and rerun with more --repeats on an idle machine."
    )


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/engine.py",
        description=(
            "Engine micro-benchmark: seconds per training step of the plain model (gradient\n"
            "accumulation), our GPipe, torchgpipe 0.0.7 and our GPipe over two virtual CPU\n"
            "devices, measured interleaved in one process, then the ratios against their\n"
            "targets: (b)/(a) >= 0.95, (b)/(c) >= 1.0, (d)/(d0) >= 1.4, each PASS or MISS.\n"
            "Then the host-bound suite: 369 tiny layers, 32 micro-batches of 2 over 8\n"
            "partitions on one device, one thread: step time against plain accumulation\n"
            "((hb)/(ha) <= 1.05 with checkpoint 'never', (he)/(ha) <= 1.35 with\n"
            "'except_last') and against torchgpipe (<= 1.0 in both modes)."
        ),
        epilog=(
            "examples:\n"
            "  python benchmarks/engine.py                    # CPU, the `make bench-engine` run\n"
            "  python benchmarks/engine.py --repeats 9 --chunks 4\n"
            "  python benchmarks/engine.py --device cuda      # on a GPU machine (make gpu-check)\n"
            "  python benchmarks/engine.py --quick --repeats 1  # seconds-long smoke run\n"
            "  python benchmarks/engine.py --suite host --repeats 7  # only the host-bound suite"
        ),
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30),
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: rows (a)-(e); cuda: rows (a)-(c) on cuda:0 (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="timed rounds over all variants, after one warm-up round (default: %(default)s)",
    )
    parser.add_argument(
        "--chunks",
        type=int,
        default=DEFAULT_CHUNKS,
        help="micro-batches M; must divide the batch (default: %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"tiny model and batch ({QUICK_WORKLOAD.batch}) for a smoke test"
    )
    parser.add_argument(
        "--suite",
        choices=["all", "overlap", "host"],
        default="all",
        help="overlap: rows (a)-(e); host: the host-bound rows (ha)-(hf); all: both, in that order "
        "(default: %(default)s)",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-round progress on stderr")
    parser.add_argument(
        "--malloc",
        choices=["steady", "default"],
        default="steady",
        help="host allocator: 'steady' keeps freed memory in the process for every variant "
        "alike (glibc mallopt); 'default' leaves glibc as it is (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.chunks < 1:
        parser.error("--chunks must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    workload = QUICK_WORKLOAD if args.quick else CUDA_WORKLOAD if args.device == "cuda" else CPU_WORKLOAD
    if workload.batch % args.chunks:
        parser.error(f"--chunks {args.chunks} does not divide the batch of {workload.batch}")
    args.workload = workload
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark and print the environment and both tables to stdout."""
    args = parse_args(argv)
    device: str = args.device
    workload: Workload = args.workload
    chunks: int = args.chunks
    log = None if args.quiet else sys.stderr

    allocator = steady_host_allocator() if args.malloc == "steady" else "default (glibc as configured)"
    lines = environment(device, workload, chunks, args.repeats)
    if args.suite == "host":  # the workload line describes the overlap suite
        lines = [line for line in lines if not line.startswith("workload:")]
    print("\n".join(lines), flush=True)
    print(f"malloc:   {allocator}", flush=True)

    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if args.suite in ("all", "overlap"):
        torch.manual_seed(0)
        base = build_model(workload)
        target = "cuda:0" if device == "cuda" else "cpu"
        x = torch.rand(workload.batch, 3, workload.spatial, workload.spatial).to(target)
        y = torch.randint(0, workload.classes, (workload.batch,)).to(target)
        variants = build_variants(base, x, y, device, chunks)
        measure(variants, args.repeats, sync, log)
        print()
        print(results_table(variants, workload.batch))
        print()
        print(ratios_table(variants, chunks, usable_cores()))
        warning = noise_warning(variants)
        if warning:
            print(warning)
    if args.suite in ("all", "host"):
        run_host_suite(QUICK_HOST_BOUND if args.quick else HOST_BOUND, device, args.repeats, sync, log)
    return 0


def run_host_suite(
    workload: HostBound, device: str, repeats: int, sync: Callable[[], None], log: Optional[TextIO]
) -> None:
    """Measure and print the host-bound suite; the intra-op thread count is restored afterwards."""
    print()
    print(host_bound_description(workload), flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(workload.threads)
    try:
        variants, batch = build_host_variants(workload, device)
        measure(variants, repeats, sync, log)
    finally:
        torch.set_num_threads(threads)
    print()
    print(results_table(variants, batch))
    print()
    print(host_ratios_table(variants, workload))
    warning = noise_warning(variants)
    if warning:
        print(warning)


if __name__ == "__main__":
    sys.exit(main())
