"""Regression tests for engine bugs.

Every bug fixed in ``gpipe_bench`` leaves a test that fails on the code before
the fix and passes after it. A bug that needs a module's own fixtures keeps its
test beside that module's tests, under a ``# Regression (fixed): ...`` comment
saying what went wrong; the rest live here. Fixed so far:

- ``tests/pipe/test_microbatch.py::test_scatter_mismatched_batch_sizes_same_chunk_count``:
  a tuple whose tensors had different batch sizes was split into misaligned micro-batches.
- ``tests/pipe/skip/test_skippable.py::test_stash_none_*``: ``stash(name, None)`` was dropped.
- ``tests/pipe/test_checkpoint.py::test_functional_dropout_mask_replayed_on_cpu_workers``:
  random draws outside dropout modules were not replayed on virtual CPU devices.
- ``tests/pipe/test_worker.py::test_barrier_across_an_empty_clock``: the clock barrier
  waited only for the previous clock.
- ``test_a_failed_steps_activations_are_freed_at_once`` (here) and
  ``tests/pipe/test_worker.py::test_a_failed_steps_locals_are_freed_without_the_cycle_collector``:
  a failed step's tensors lived until the cycle collector ran (the re-raised error and its frame
  held each other).
- ``tests/pipe/test_batchnorm.py::test_commit_comes_after_every_device_is_joined`` (CUDA half:
  ``tests/pipe/test_cuda.py::test_deferred_batchnorm_commit_waits_for_every_gpu_under_a_caller_stream``):
  deferred BatchNorm statistics were committed on the caller's stream ordered after the last
  partition's device only.
- ``test_the_suite_has_a_global_timeout_that_dumps_every_thread`` (here): a deadlocked test hung
  ``make test`` until CI's limit.
- ``tests/pipe/test_cuda.py`` (GPU only): GPU-to-host copies read before they landed;
  a non-default caller stream joined on one device only; a tuple's ready event recorded
  only when its first tensor was on a GPU. Their CPU-visible halves are below.

Harness bugs, beside their modules' tests:

- ``tests/measure/test_speed.py::test_ctrl_c_says_how_many_epochs_finished``: Ctrl-C in the
  warm-up epoch reported one epoch too many.
- ``tests/measure/test_speed.py::test_out_of_memory_is_a_row`` and
  ``tests/engines/test_local.py::test_allocation_failures_are_out_of_memory``: a host allocation
  failure was a crash, not an ``oom`` row.
- ``tests/test_report.py::test_the_newer_record_of_a_row_wins_by_time_not_by_text``: the newest
  record was chosen by comparing local-time strings.
- ``tests/test_jobs.py::test_naive_n_is_the_split_model_in_every_table``: ``naive-N`` was the
  split model in speed rows but the plain model in memory rows.
- ``tests/test_environment.py::test_a_multi_host_run_is_kept_apart_from_one_host``: a multi-host
  run was filed under rank 0's host.
- ``tests/test_config.py::test_a_model_that_cannot_be_imported_is_an_error_not_a_skipped_check``
  and ``::test_settings_extra_is_validated``: an ImportError skipped the balance check silently;
  ``settings.extra`` was never validated.
- ``tests/test_results.py::test_results_go_to_the_working_directory`` and
  ``tests/test_config.py::test_configs_ship_inside_the_package``: a non-editable install had no
  tables and wrote results beside the package.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

from gpipe_bench.memory.tracker import TensorMemory
from gpipe_bench.pipe import GPipe, checkpoint, worker
from gpipe_bench.pipe.skip import Namespace
from helpers import Pop, Stash


def test_recompute_does_not_update_plain_batchnorm_twice() -> None:
    """A checkpointed micro-batch's recompute used to update plain BatchNorm statistics again."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    gpipe = GPipe(
        nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double(),
        [1, 1],
        devices=["cpu", "cpu"],
        chunks=2,
        checkpoint="always",
    )
    for p, q in zip(gpipe.parameters(), plain.parameters()):
        with torch.no_grad():
            p.copy_(q)
    x = torch.randn(8, 3, dtype=torch.float64)
    gpipe(x).sum().backward()
    for piece in x.chunk(2):
        plain(piece)
    bn, ref = gpipe[1], plain[1]
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    assert torch.allclose(bn.running_mean, ref.running_mean, rtol=1e-12)
    assert torch.allclose(bn.running_var, ref.running_var, rtol=1e-12)


class _Spy(torch.autograd.Function):
    """Identity whose backward records the thread it runs on and whether autograd may hand work elsewhere."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, log: List[Tuple[str, bool]]) -> Tensor:
        ctx.log = log
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        ctx.log.append((threading.current_thread().name, torch.autograd.is_multithreading_enabled()))
        return grad, None


class SpyLayer(nn.Module):
    def __init__(self, log: List[Tuple[str, bool]]) -> None:
        super().__init__()
        self.log = log
        self.linear = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = _Spy.apply(self.linear(x), self.log)
        return out


def test_each_worker_runs_its_cells_backward_itself() -> None:
    """Workers' torch.autograd.grad let PyTorch hand GPU work to its per-device autograd thread.

    That thread can be the one blocked in the pipeline's backward waiting for the worker:
    with two GPUs every backward deadlocked. Workers now turn multithreaded backward off
    for themselves (the caller's setting stays), so each cell's backward runs on its worker.
    """
    log: List[Tuple[str, bool]] = []
    model = nn.Sequential(SpyLayer(log), SpyLayer(log))
    gpipe = GPipe(model, [1, 1], devices=["cpu:0", "cpu:1"], chunks=2)
    gpipe(torch.randn(4, 4)).sum().backward()
    assert len(log) == 4
    assert all(name.startswith("gpipe-worker-") and not enabled for name, enabled in log), log
    assert torch.autograd.is_multithreading_enabled()


def test_skip_gradients_are_released_when_consumed() -> None:
    """A skip's gradient was read with .get and kept until the end of the backward, once per micro-batch.

    ResNet-101 pipeline-2 cuts inside a bottleneck: ~3.3 GB extra at the published size.
    With the fix, the popping device's peak does not grow with the number of micro-batches
    (same micro-batch size): it holds a skip gradient only until the stashing partition used it.
    """
    width, rows = 4096, 4
    skip_grad = rows * width * 4

    def peak_of_popper(chunks: int) -> int:
        torch.manual_seed(0)
        ns = Namespace()
        model = nn.Sequential(
            nn.Linear(width, width), Stash().isolate(ns), nn.Tanh(), nn.Tanh(), Pop().isolate(ns), nn.Linear(width, 1)
        )
        gpipe = GPipe(model, [2, 2, 2], devices=["cpu:0", "cpu:1", "cpu:2"], chunks=chunks, checkpoint="always")
        x = torch.randn(rows * chunks, width)
        meter = TensorMemory(default_owner=9)
        with meter.metering():
            gpipe(x).sum().backward()
        meter.exclude(p.grad for p in gpipe.parameters())
        return meter.curves()[2].peak

    few, many = peak_of_popper(2), peak_of_popper(8)
    assert many <= few + skip_grad, f"popper's peak grew from {few} to {many} bytes (a skip gradient is {skip_grad})"


class _Tap(nn.Module):
    """Returns a fresh tensor and keeps a weak reference to each one it returned."""

    def __init__(self, refs: List["weakref.ref[Tensor]"]) -> None:
        super().__init__()
        self.refs = refs

    def forward(self, x: Tensor) -> Tensor:
        out = x * 2
        self.refs.append(weakref.ref(out))
        return out


def test_checkpointed_outputs_are_not_kept_until_backward() -> None:
    """A checkpointed cell kept its first forward's outputs (on the source GPU) until its backward.

    They are recomputed before the backward, so once handed to the next partition the
    engine drops them: on distinct GPUs that frees one boundary per micro-batch. On CPU the
    next partition's input shares the storage, so the check is on the tensor objects.
    """
    refs: List["weakref.ref[Tensor]"] = []
    model = nn.Sequential(nn.Linear(4, 4), _Tap(refs), nn.Linear(4, 4))
    gpipe = GPipe(model, [2, 1], devices=["cpu:0", "cpu:1"], chunks=3, checkpoint="always")
    out = gpipe(torch.randn(6, 4))
    assert len(refs) == 3 and all(ref() is None for ref in refs)
    out.sum().backward()


def test_host_generator_is_swapped_only_under_the_lock_next_to_other_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recompute swapped the host generator in and out without the lock while other workers could draw.

    GPU workers did so for every checkpointed cell (and CPU partitions that never draw did
    too), so a concurrent CPU partition's dropout could draw from another partition's saved
    state. Now a partition that never drew leaves the host generator alone, and one that did
    swaps it under the lock its draws take.
    """
    real = torch.set_rng_state
    unlocked: List[str] = []

    def guarded(state: Tensor) -> None:
        if threading.current_thread().name.startswith("gpipe-worker-") and not checkpoint.CPU_RNG_LOCK.locked():
            unlocked.append(threading.current_thread().name)
        real(state)

    monkeypatch.setattr(torch, "set_rng_state", guarded)
    for layers in ([nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)], [nn.Dropout(0.5), nn.Linear(4, 4), nn.Linear(4, 4)]):
        gpipe = GPipe(
            nn.Sequential(*layers), [1, 1, 1], devices=["cpu:0", "cpu:1", "cpu:2"], chunks=4, checkpoint="always"
        )
        gpipe(torch.randn(8, 4)).sum().backward()
    assert not unlocked, f"host generator swapped without the lock on {sorted(set(unlocked))}"


def test_clock_barrier_waits_are_linear_in_clocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step waited on every earlier clock's event: quadratic in micro-batches (~35 ms per step at 256)."""
    waited: Dict[int, int] = {}
    real = worker._Clocks.wait

    def counting(self: Any, since: int, clock: int) -> None:
        ident = threading.get_ident()
        waited[ident] = waited.get(ident, 0) + max(0, clock - since)
        real(self, since, clock)

    monkeypatch.setattr(worker._Clocks, "wait", counting)
    clocks = 300

    def noop() -> None:
        pass

    plan = [[(c, noop) for c in range(clocks)], [(c, noop) for c in range(0, clocks, 3)]]
    worker.execute(plan, [lambda: _Null(), lambda: _Null()], clocks)
    assert len(waited) == 2 and max(waited.values()) <= clocks


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu:0", "cpu:1"]])
def test_a_failed_steps_activations_are_freed_at_once(devices: List[str]) -> None:
    """A failed step's activations stayed alive until Python's cycle collector ran.

    The re-raised error and the frame that raised it referred to each other, so after an
    out-of-memory step the next row could start with the failed one's tensors still held.
    """
    made: List["weakref.ref[Tensor]"] = []

    class Keep(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            y = x * 2
            made.append(weakref.ref(y))
            return y

    class Fail(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("out of memory (simulated)")

    gpipe = GPipe(nn.Sequential(Keep(), Keep(), Fail()), [2, 1], devices=devices, chunks=4)
    gc.disable()
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            gpipe(torch.rand(8, 3, requires_grad=True))
        assert made and all(ref() is None for ref in made)
    finally:
        gc.enable()


def test_the_suite_has_a_global_timeout_that_dumps_every_thread(request: pytest.FixtureRequest) -> None:
    """A deadlocked test (a CPU pipeline's workers waiting on each other) hung `make test` until CI's limit."""
    assert float(request.config.getini("timeout")) > 0
    assert request.config.getini("timeout_method") == "thread"
