"""The simulated schedules against schedules worked out by hand."""

import os
from typing import List

import pytest

from gpipe_bench.distributed import launch
from gpipe_bench.predict.hardware import Link
from gpipe_bench.predict.orders import orders, stage_ranks
from gpipe_bench.predict.simulate import (
    CellCost,
    Extra,
    Host,
    LayerCost,
    gpipe,
    pipelining,
    plain,
    rank_threads,
    worker_threads,
)

HOST = Host(cores=64, threads=64)


def _none(a: str, b: str) -> None:
    return None


def _equal(m: int, k: int, f: float = 1.0, b: float = 2.0) -> List[List[CellCost]]:
    return [[CellCost(f, b)] * k for _ in range(m)]


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
@pytest.mark.parametrize("k,m", [(2, 1), (2, 4), (4, 8), (8, 32), (3, 5)])
def test_fill_drain_bubble(kind: str, k: int, m: int) -> None:
    """Equal partitions, no recompute: (M + K - 1) clocks each way; bubble (K - 1) / (M + K - 1)."""
    out = gpipe(_equal(m, k), [f"{kind}:{j}" for j in range(k)], 0, HOST, _none)
    assert out.seconds == pytest.approx(3.0 * (m + k - 1))
    assert out.bubble == pytest.approx((k - 1) / (m + k - 1))
    assert out.busiest == pytest.approx(m / (m + k - 1))


def test_recompute_placement_costs_one_forward_per_clock_on_the_last_partition() -> None:
    """K=2, M=4, all checkpointed, F=1, B=2.

    Forward: 5 clocks of 1. Backward clocks (5): the last partition recomputes and backwards (i, 1) in
    the same clock (3 each, 4 clocks); partition 0 recomputes (i, 0) one clock before its backward,
    beside partition 1's work (1 + 2 = 3 <= 3 in clocks 1-3) and backwards micro-batch 0 alone last (2).
    """
    out = gpipe(_equal(4, 2), ["cuda:0", "cuda:1"], 4, HOST, _none)
    assert out.seconds == pytest.approx(5 * 1 + 4 * 3 + 2)
    recomputes = [s for s in out.timeline.spans if s.phase == "recompute"]
    assert len(recomputes) == 8
    # recompute of (i, 0) ends before the backward of (i, 0) starts, and after the backward (i + 1, 1) began
    for i in range(4):
        r = next(s for s in recomputes if (s.micro_batch, s.partition) == (i, 0))
        b = next(s for s in out.timeline.spans if s.phase == "backward" and (s.micro_batch, s.partition) == (i, 0))
        assert r.end <= b.start


def test_except_last_skips_one_recompute() -> None:
    always = gpipe(_equal(4, 2), ["cuda:0", "cuda:1"], 4, HOST, _none)
    except_last = gpipe(_equal(4, 2), ["cuda:0", "cuda:1"], 3, HOST, _none)
    assert except_last.seconds == pytest.approx(always.seconds - 1)


def test_the_slowest_partition_sets_every_clock() -> None:
    cells = [[CellCost(1.0, 2.0), CellCost(3.0, 6.0)] for _ in range(4)]
    out = gpipe(cells, ["cpu:0", "cpu:1"], 0, HOST, _none)
    # forward: clock 0 only partition 0 (1), clocks 1-3 both (3), clock 4 only partition 1 (3); backward doubled
    assert out.seconds == pytest.approx((1 + 3 * 3 + 3) * 3)


def test_copies_between_gpus_delay_the_next_partition() -> None:
    cells = [[CellCost(1.0, 2.0, out_bytes=100)] * 2]
    link = Link("pcie", bandwidth=100.0, latency=0.5)  # 1.5 s per copy
    out = gpipe(cells, ["cuda:0", "cuda:1"], 0, HOST, lambda a, b: link)
    assert out.seconds == pytest.approx(1 + 1.5 + 1 + 2 + 1.5 + 2)
    copies = [s for s in out.timeline.spans if s.phase == "copy"]
    assert {s.lane for s in copies} == {"copy cuda:0->cuda:1", "copy cuda:1->cuda:0"}


def test_virtual_cpu_devices_share_the_cores() -> None:
    """Two one-thread workers on one core take twice as long as on two cores."""
    cells = _equal(8, 2)
    two = gpipe(cells, ["cpu:0", "cpu:1"], 0, Host(cores=2, threads=2), _none)
    one = gpipe(cells, ["cpu:0", "cpu:1"], 0, Host(cores=1, threads=2), _none)
    # on one core, clocks where both run take twice as long; fill and drain clocks do not
    assert one.seconds == pytest.approx(3 * (1 + 2 * 7 + 1))
    assert two.seconds == pytest.approx(3 * 9)


def test_forward_host_work_of_gpu_workers_shares_one_interpreter() -> None:
    """GPU cells issued from one interpreter: forwards take turns at its lock, backwards (C++) do not.

    K=2, M=4, host 1 s per cell, device time negligible: the 8 forwards run one at a time (8 s); the
    backward clocks run both workers at once (5 clocks of 1 s).
    """
    cells = [[CellCost(0.01, 0.01, forward_host=1.0, backward_host=1.0)] * 2 for _ in range(4)]
    out = gpipe(cells, ["cuda:0", "cuda:1"], 0, HOST, _none)
    assert out.seconds == pytest.approx(8.0 + 5.0, abs=0.1)


@pytest.mark.parametrize(
    "devices", [["cpu:0", "cpu:1"], ["cpu:0"], ["cpu:0", "cpu:0"], ["cpu", "cpu"], ["cpu:0", "cpu:1", "cpu:2"]]
)
def test_threads_per_worker_are_what_the_engine_sets(devices: List[str]) -> None:
    """The simulator's threads per CPU worker are the ones the engine's workers really run with."""
    import torch
    from torch import nn

    from gpipe_bench.pipe import GPipe
    from helpers import ThreadCount

    seen: List[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(6)
    try:
        GPipe(nn.Sequential(*[ThreadCount(seen) for _ in devices]), [1] * len(devices), devices=devices)(
            torch.ones(2, 1)
        )
        expected = worker_threads(devices, Host(cores=6, threads=6))
    finally:
        torch.set_num_threads(before)
    assert seen == [expected] * len(devices)


def test_a_gpu_worker_does_not_take_a_share_of_the_threads() -> None:
    assert worker_threads(["cuda:0", "cpu:0"], Host(cores=2, threads=2)) == 2


def test_plain_step_adds_everything() -> None:
    out = plain(CellCost(1.0, 2.0), "cpu", HOST, Extra(loss=(0.0, 0.5), optimizer={"cpu": (0.0, 0.25)}))
    assert out.seconds == pytest.approx(3.75)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipelining_single_stage_schedules_match_fill_drain(schedule: str) -> None:
    k, m = 4, 8
    out = pipelining(
        orders(schedule, k, k, m),
        lambda s, i: CellCost(1.0, 2.0),
        stage_ranks(schedule, k, k),
        [f"cuda:{r}" for r in range(k)],
        HOST,
        _none,
    )
    assert out.seconds == pytest.approx(3.0 * (m + k - 1))


def test_interleaved_shrinks_the_bubble() -> None:
    k, p, m = 8, 4, 8
    cost = CellCost(0.5, 1.0)
    out = pipelining(
        orders("interleaved", k, p, m),
        lambda s, i: cost,
        stage_ranks("interleaved", k, p),
        [f"cuda:{r}" for r in range(p)],
        HOST,
        _none,
    )
    one_stage_each = 3.0 * (m + p - 1)
    assert out.seconds < one_stage_each
    assert out.seconds >= 3.0 * m  # never faster than no bubble at all


@pytest.mark.parametrize("nproc", [1, 2, 3, 5])
def test_threads_per_rank_are_what_the_launcher_sets(nproc: int) -> None:
    """The simulator's threads per rank are what `gpipe-bench launch` gives each rank (OMP_NUM_THREADS)."""
    cores = len(os.sched_getaffinity(0))
    assert rank_threads(nproc, Host(cores=cores, threads=cores)) == launch.thread_count(nproc)
    assert launch.thread_count(nproc) == launch.rank_threads(nproc, cores)


def test_a_checkpointed_first_forward_costs_its_no_grad_share_of_host_and_device() -> None:
    """One rule (LayerCost.first_forward) for the simulator's forward of a checkpointed micro-batch."""
    cost = CellCost(forward=2.0, backward=4.0, forward_host=1.0, backward_host=1.0, nograd=0.25)
    assert cost.first_forward(checkpointed=False) == (1.0, 2.0)
    assert cost.first_forward(checkpointed=True) == (0.25, 0.5)
    assert LayerCost(forward=2.0, backward=0.0, forward_host=1.0, nograd=0.5).first_forward(True) == (0.5, 1.0)
    # One partition on a GPU lane, two micro-batches, the first checkpointed: its forward's device time
    # (what a GPU lane's span shows) is the no-grad share, the second's the whole forward.
    out = gpipe([[cost], [cost]], ["cuda:0"], 1, HOST, _none)
    forwards = sorted((s.micro_batch, s.end - s.start) for s in out.timeline.spans if s.phase == "forward")
    assert [d for _, d in forwards] == [pytest.approx(0.5), pytest.approx(2.0)]


def test_torchgpipes_backward_runs_every_cpu_partition_on_autograds_one_thread() -> None:
    """Its forward clocks are ours; its backward is autograd's: on CPUs one thread, so the partitions take turns."""
    cells = [[CellCost(1.0, 2.0)] * 2 for _ in range(4)]
    devices = ["cpu:0", "cpu:1"]
    ours = gpipe(cells, devices, 0, Host(cores=2, threads=2), _none)
    peer = gpipe(cells, devices, 0, Host(cores=2, threads=2), _none, engine="torchgpipe")

    def overlapping(outcome: object) -> bool:
        spans = [s for s in outcome.timeline.spans if s.phase == "backward"]  # type: ignore[attr-defined]
        return any(a.start < b.end and b.start < a.end for a in spans for b in spans if a is not b)

    assert overlapping(ours) and not overlapping(peer)
    forward = [(s.lane, s.start, s.end) for s in ours.timeline.spans if s.phase == "forward"]
    assert forward == [(s.lane, s.start, s.end) for s in peer.timeline.spans if s.phase == "forward"]
    assert peer.seconds == pytest.approx(5 * 1.0 + 8 * 2.0)  # the forward's 5 clocks, then every backward in turn
    assert peer.timeline.meta["engine"] == "torchgpipe"


def test_torchgpipes_backward_on_gpus_has_no_barrier_between_clocks() -> None:
    """Each GPU's autograd thread starts a backward as soon as its gradient has arrived."""
    cells = [[CellCost(1.0, 1.0), CellCost(1.0, 3.0)] for _ in range(3)]
    ours = gpipe(cells, ["cuda:0", "cuda:1"], 0, HOST, _none)
    peer = gpipe(cells, ["cuda:0", "cuda:1"], 0, HOST, _none, engine="torchgpipe")
    assert peer.seconds <= ours.seconds
