"""The steps of ``make gpu-check`` that run inside a child process, on the GPU: ``gpu_check.py --child NAME``.

They are apart from the driver (``gpu_check.py``) because the driver must
never import torch: a hang in CUDA start-up, or a step stuck in a kernel,
would then hang the one process that has to end in time and print the
summary. So each step here runs in a process of its own, which the driver
can stop; torch and the engine are imported inside the functions, never when
this module is loaded.

A step prints lines ``FIGURE: ...`` (shown in the summary) and returns its
exit code: 0 on pass, 1 on fail. The timed helpers (:func:`mixed_timed`,
:func:`profile_figures`) also run on CPU devices, which is how the tests
cover them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Sequence, Tuple

if TYPE_CHECKING:
    from torch import nn


def _figure(text: str) -> None:
    print(f"FIGURE: {text}", flush=True)


def child_probe() -> int:
    """The driver's view of the machine, from a child so that a hang in CUDA start-up cannot hang the driver.

    Prints ``ENV: ...`` lines; exits 3 without torch and 4 without CUDA.
    """
    try:
        import torch
    except ImportError:
        return 3
    if not torch.cuda.is_available():
        return 4
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"card:   {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
        f"{torch.cuda.device_count()} visible",
        f"torch:  {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",  # type: ignore[no-untyped-call]
    ]
    for line in lines:
        print(f"ENV: {line}", flush=True)
    return 0


def _synchronizer(devices: Sequence[str]) -> Callable[[], None]:
    """``torch.cuda.synchronize`` when a device is a GPU, else nothing: the timed helpers also run on CPU (tests)."""
    import torch

    if any(torch.device(d).type == "cuda" for d in devices):
        return torch.cuda.synchronize
    return lambda: None


def step_mixed() -> int:
    import copy

    import torch
    from torch import nn

    from gpipe_bench.pipe import GPipe

    ok = True
    for devices in (["cpu", "cuda:0"], ["cuda:0", "cpu"]):
        torch.manual_seed(0)
        plain = nn.Sequential(
            nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 8)
        ).double()
        gpipe = GPipe(copy.deepcopy(plain), [3, 2], devices=devices, chunks=4, checkpoint="except_last")
        x = torch.randn(32, 16, dtype=torch.float64, device=devices[0], requires_grad=True)
        out = gpipe(x)
        torch.autograd.backward(out.square().sum())
        torch.cuda.synchronize()
        xr = x.detach().cpu().requires_grad_()
        ref = torch.cat([plain(piece) for piece in xr.chunk(4)])
        torch.autograd.backward(ref.square().sum())
        assert x.grad is not None and xr.grad is not None
        errors = [(out.detach().cpu() - ref.detach()).abs().max().item(), (x.grad.cpu() - xr.grad).abs().max().item()]
        for p, q in zip(gpipe.parameters(), plain.parameters()):
            assert p.grad is not None and q.grad is not None
            errors.append((p.grad.cpu() - q.grad).abs().max().item())
        worst = max(errors)
        ok = ok and worst < 1e-9
        _figure(f"{devices}: largest difference to the plain model {worst:.2e} (bound 1e-9)")
    return 0 if ok else 1


def mixed_timed(devices: Sequence[str], chunks: int = 8, micro: int = 16, repeats: int = 5) -> Tuple[bool, List[str]]:
    """Check, then time, training steps of a small float64 model over ``devices``.

    The check: one forward and backward (mean cross-entropy) against the plain
    model run on the host over the same micro-batches (per micro-batch, so that
    BatchNorm sees the same batches), every gradient within 1e-9. The timing:
    zero_grad, forward, backward and an SGD step, synchronised before and after,
    two warm-up steps then the median (and min-max) of ``repeats``. A GPU
    device twice around the host exercises one worker serving two partitions
    with host hops in between, a path the plain CUDA runs do not take.
    """
    import copy
    import statistics

    import torch
    from torch import nn

    from gpipe_bench.pipe import GPipe

    sync = _synchronizer(devices)
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Linear(64, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    ).double()
    gpipe = GPipe(copy.deepcopy(plain), [3, 2, 3], devices=list(devices), chunks=chunks, checkpoint="except_last")
    x = torch.randn(chunks * micro, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (chunks * micro,))
    xg, yg = x.to(gpipe.devices[0]), y.to(gpipe.devices[-1])

    loss = torch.nn.functional.cross_entropy(gpipe(xg), yg)
    torch.autograd.backward(loss)
    sync()
    ref = torch.nn.functional.cross_entropy(torch.cat([plain(piece) for piece in x.chunk(chunks)]), y)
    torch.autograd.backward(ref)
    errors = [abs(loss.item() - ref.item())]
    for p, q in zip(gpipe.parameters(), plain.parameters()):
        assert p.grad is not None and q.grad is not None
        errors.append((p.grad.cpu() - q.grad).abs().max().item())
    worst = max(errors)
    ok = worst < 1e-9

    optimizer = torch.optim.SGD(gpipe.parameters(), lr=0.01)

    def step() -> None:
        optimizer.zero_grad()
        torch.autograd.backward(torch.nn.functional.cross_entropy(gpipe(xg), yg))
        optimizer.step()

    for _ in range(2):
        step()
    times: List[float] = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    figures = [
        f"{list(devices)}: gradients' largest difference to the plain model {worst:.2e} (bound 1e-9)",
        f"{list(devices)}, {chunks} micro-batches of {micro}, float64: training step median "
        f"{statistics.median(times) * 1e3:.1f} ms (min-max {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}) "
        f"over {repeats} after 2 warm-up",
    ]
    return ok, figures


def step_mixed_timed() -> int:
    ok, figures = mixed_timed(["cuda:0", "cpu", "cuda:0"])
    for line in figures:
        _figure(line)
    return 0 if ok else 1


def _count_syncs(chunks: int, devices: Sequence[str]) -> int:
    import warnings

    import torch
    from torch import nn

    from gpipe_bench.pipe import GPipe

    torch.manual_seed(0)
    model = nn.Sequential(
        *[layer for _ in range(4) for layer in (nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU())],
        nn.Linear(256, 10),
    )
    gpipe = GPipe(model, [7, 6], devices=list(devices), chunks=chunks, checkpoint="except_last")
    optimizer = torch.optim.SGD(gpipe.parameters(), lr=0.1)
    x = torch.randn(chunks * 8, 256, device=gpipe.devices[0])
    y = torch.randint(0, 10, (chunks * 8,), device=gpipe.devices[-1])

    def step() -> None:
        optimizer.zero_grad()
        torch.autograd.backward(torch.nn.functional.cross_entropy(gpipe(x), y))
        optimizer.step()

    step()  # warm-up: lazy initialisation is not the engine's per-step cost
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum(1 for w in caught if "synchroniz" in str(w.message))


def step_syncs() -> int:
    devices = ["cuda:0", "cuda:0"]
    few, many = _count_syncs(4, devices), _count_syncs(16, devices)
    _figure(f"host syncs per training step on {devices}: {few} at 4 micro-batches, {many} at 16 (target: equal)")
    return 0 if many == few else 1


def busy_seconds(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals in microseconds, in seconds.

    Kernels on different streams overlap; summing their durations would count
    the overlap twice, and "busy" means at least one kernel running.
    """
    busy, until = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > until:
            busy += b - max(a, until)
            until = b
    return busy / 1e6


def profile_figures(
    model: nn.Sequential,
    balance: Sequence[int],
    devices: Sequence[str],
    micro: int,
    chunks: int,
    sample: Sequence[int],
    classes: int,
    label: str,
    repeats: int = 3,
) -> List[str]:
    """Wall, GPU-busy and host times of a GPipe training step, and the plain model's host time beside it.

    Three figures, each from the run that measures it without distortion:

    - wall time and the engine's host time per cell: steps with no profiler
      (median over ``repeats``), observed with :func:`~gpipe_bench.pipe.observing`
      (one small record per cell). The profiler records every operator on
      the host, which inflates host time and so the wall time of a host-bound
      step.
    - GPU-busy time: the union of the kernels' (and copies') device intervals
      of one step under the profiler. Those are device timestamps, which the
      profiler's host-side cost does not stretch; divided by the unprofiled
      wall time it is the fraction of a real step the GPU is busy (noise can
      take it slightly past 100 %).
    - host time per micro-batch: for the engine, the sum of its cells' host time
      (forward, recompute, backward) over a step, divided by the micro-batches;
      for the plain model (the same model whole on the first device, gradient
      accumulation over the same micro-batches), the time its forward and
      backward calls take to return, with no synchronisation inside, divided by
      the micro-batches. Both are issue time: when the GPU falls behind and the
      launch queue fills up, a call waits, in both alike.

    ``model`` is partitioned in place; the plain model is a copy taken first.
    """
    import copy
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile

    from gpipe_bench.pipe import GPipe, Observer, StepRecord, observing

    class Cells(Observer):
        def __init__(self) -> None:
            self.records: List[StepRecord] = []

        def step(self, record: StepRecord) -> None:
            self.records.append(record)

    sync = _synchronizer(devices)
    plain = copy.deepcopy(model).to(devices[0])
    gpipe = GPipe(model, list(balance), devices=list(devices), chunks=chunks, checkpoint="except_last")
    optimizer = torch.optim.SGD(gpipe.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(micro * chunks, *sample, device=gpipe.devices[0])
    y = torch.randint(0, classes, (micro * chunks,), device=gpipe.devices[-1])

    def step() -> None:
        optimizer.zero_grad()
        torch.autograd.backward(torch.nn.functional.cross_entropy(gpipe(x), y))
        optimizer.step()

    for _ in range(2):
        step()
    sync()
    walls: List[float] = []
    engine_host: List[float] = []
    per_kind: Dict[str, List[float]] = defaultdict(list)
    for _ in range(repeats):
        cells = Cells()
        with observing(cells):
            sync()
            start = time.perf_counter()
            step()
            sync()
            walls.append(time.perf_counter() - start)
        engine_host.append(sum(r.host_ns for r in cells.records) / 1e9 / chunks)
        for r in cells.records:
            per_kind[r.kind].append(r.host_ns / 1e6)
    wall = statistics.median(walls)

    cuda = any(torch.device(d).type == "cuda" for d in devices)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    busy = busy_seconds(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    )

    plain_x, plain_y = x.to(devices[0]).chunk(chunks), y.to(devices[0]).chunk(chunks)

    def accumulate() -> None:
        for xc, yc in zip(plain_x, plain_y):
            torch.autograd.backward(torch.nn.functional.cross_entropy(plain(xc), yc) / chunks)

    accumulate()  # warm-up (allocator, cuDNN's choices)
    plain_host: List[float] = []
    for _ in range(repeats):
        plain.zero_grad()
        sync()
        start = time.perf_counter()
        accumulate()
        plain_host.append((time.perf_counter() - start) / chunks)
        sync()

    figures = [
        f"{label}: step {wall * 1e3:.0f} ms without the profiler (median of {repeats}); GPU busy {busy / wall:.1%} "
        f"of it (kernel time of a profiled step / that wall time)",
        f"host time per micro-batch: engine {statistics.median(engine_host) * 1e3:.2f} ms (its cells' host time, "
        f"recompute included, / {chunks}), plain model {statistics.median(plain_host) * 1e3:.2f} ms "
        f"(forward and backward calls returning, gradient accumulation)",
    ]
    for kind in ("forward", "recompute", "backward"):
        times = per_kind.get(kind, [])
        if times:
            figures.append(
                f"engine host time per {kind} cell: median {statistics.median(times):.2f} ms, "
                f"max {max(times):.2f} ms over {len(times)} cells ({repeats} steps)"
            )
    return figures


def step_profile() -> int:
    import torch

    from gpipe_bench import models

    micro, chunks = 16, 32
    torch.manual_seed(0)
    model = models.build("resnet101", num_classes=1000)
    label = f"ResNet-101 pipeline-2 on cuda:0*2, {chunks} micro-batches of {micro} at 224x224"
    for line in profile_figures(model, [140, 230], ["cuda:0", "cuda:0"], micro, chunks, (3, 224, 224), 1000, label):
        _figure(line)
    return 0


STEPS_IN_CHILD: Dict[str, Callable[[], int]] = {
    "probe": child_probe,
    "mixed": step_mixed,
    "mixed-timed": step_mixed_timed,
    "syncs": step_syncs,
    "profile": step_profile,
}
