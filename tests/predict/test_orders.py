"""Our action orders against the schedules of torch.distributed.pipelining, built as a user builds them.

A schedule computes every rank's order when it is constructed and keeps it in
its public ``pipeline_order``. Constructing one needs stages, and a stage needs
a default process group of the pipeline's size: torch's ``fake`` backend gives
one in this process (rank 0 of ``world``) that never communicates. Building a
schedule sends nothing, so that is all these tests need.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from gpipe_bench.predict.orders import Action, gpipe, interleaved, one_f_one_b, orders, stage_ranks

CPU = torch.device("cpu")

#: What each kind of torch's actions is here; gradient reductions (after the last backward) are not ours to order.
KINDS = {"FORWARD": "F", "FULL_BACKWARD": "B"}
SKIPPED = {"REDUCE_GRAD"}


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output.sum()


@contextmanager
def _process_group(world: int) -> Iterator[None]:
    """A default process group of ``world`` ranks with this process as rank 0, for the block."""
    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group(dist.Backend.FAKE, rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _as_ours(pipeline_order: Optional[Dict[int, List[Any]]]) -> Dict[int, List[Action]]:
    """torch's ``pipeline_order`` as our Actions: idle slots and gradient reductions left out.

    Reads the fields every entry of the table has (``computation_type``, ``stage_index``,
    ``microbatch_index``); an action of a kind we do not model (a split backward) fails here.
    """
    assert pipeline_order is not None
    out: Dict[int, List[Action]] = {}
    for rank, actions in pipeline_order.items():
        kept = []
        for action in actions:
            if action is None:
                continue
            kind = action.computation_type.name
            if kind in SKIPPED:
                continue
            assert kind in KINDS, f"torch's order has an action of kind {kind}: predict/orders.py does not model it"
            kept.append(Action(KINDS[kind], action.stage_index, action.microbatch_index))
        out[rank] = kept
    return out


def _single(schedule: type, stages: int, m: int) -> Dict[int, List[Action]]:
    """torch's order of a one-stage-per-rank schedule (GPipe, 1F1B) of ``stages`` stages and ``m`` micro-batches."""
    with _process_group(1):  # the table covers every stage whatever the group: one rank is enough to build it
        stage = PipelineStage(nn.Identity(), 0, stages, CPU)
        return _as_ours(schedule(stage, m, loss_fn=_loss).pipeline_order)


def _interleaved(processes: int, local: int, m: int) -> Dict[int, List[Action]]:
    """torch's interleaved 1F1B order: ``local`` stages on each of ``processes`` ranks (rank 0's built here)."""
    with _process_group(processes):
        stages = [PipelineStage(nn.Identity(), k * processes, processes * local, CPU) for k in range(local)]
        return _as_ours(ScheduleInterleaved1F1B(stages, m, loss_fn=_loss).pipeline_order)


def _actions(text: str, stage: int) -> List[Action]:
    """``"F0 F1 B0"`` on ``stage`` as Actions."""
    return [Action(word[0], stage, int(word[1:])) for word in text.split()]


def _staged(text: str) -> List[Action]:
    """``"0F0 2B1"`` (stage, kind, micro-batch, as torch prints them) as Actions."""
    out = []
    for word in text.split():
        kind = "F" if "F" in word else "B"
        stage, micro_batch = word.split(kind)
        out.append(Action(kind, int(stage), int(micro_batch)))
    return out


def _renumbered_forwards(actions: Sequence[Action]) -> List[Action]:
    return [Action(a.kind, a.stage, a.micro_batch + 1) if a.kind == "F" else a for a in actions]


# -- the grid: ours is torch's ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stages", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 32])
def test_gpipe_order_is_torchs(stages: int, m: int) -> None:
    assert gpipe(stages, m) == _single(ScheduleGPipe, stages, m)


@pytest.mark.parametrize("stages,m", [(2, 2), (2, 3), (2, 8), (3, 3), (3, 5), (4, 4), (4, 8), (8, 8), (8, 32)])
def test_1f1b_order_is_torchs(stages: int, m: int) -> None:
    ours, theirs = one_f_one_b(stages, m), _single(Schedule1F1B, stages, m)
    last = stages - 1
    assert {s: a for s, a in ours.items() if s != last} == {s: a for s, a in theirs.items() if s != last}
    # On the last stage torch's table (kept for its visualisations) numbers the forwards from 1; what its
    # _step_microbatches runs there is F0 B0 F1 B1 ...: one warm-up forward, the rule min(M, S - s) of every stage.
    assert ours[last] == [Action(k, last, i) for i in range(m) for k in "FB"]
    assert theirs[last] in (ours[last], _renumbered_forwards(ours[last]))


def test_1f1b_needs_as_many_micro_batches_as_stages_in_torch() -> None:
    with pytest.raises(ValueError, match="must be greater than or equal to the number of stages"):
        _single(Schedule1F1B, 4, 3)


@pytest.mark.parametrize("processes,local", [(2, 2), (2, 3), (3, 2), (4, 2)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 8, 9, 12])
def test_interleaved_order_is_torchs(processes: int, local: int, m: int) -> None:
    """Where torch refuses a micro-batch count (not whole rounds), ours refuses it too."""
    try:
        theirs = _interleaved(processes, local, m)
    except ValueError as refused:
        assert "requires the number of microbatches" in str(refused)
        with pytest.raises(ValueError, match="whole rounds"):
            interleaved(processes, local, m)
        return
    assert interleaved(processes, local, m) == theirs


# -- two small cases written out: either side changing fails here ------------------------------------------------


def test_1f1b_of_two_stages_and_three_micro_batches() -> None:
    expected = {0: _actions("F0 F1 B0 F2 B1 B2", 0), 1: _actions("F0 B0 F1 B1 F2 B2", 1)}
    assert one_f_one_b(2, 3) == orders("1f1b", 2, 2, 3) == expected
    theirs = _single(Schedule1F1B, 2, 3)
    assert theirs[0] == expected[0]
    assert theirs[1] in (expected[1], _actions("F1 B0 F2 B1 F3 B2", 1))  # the last stage's table, as above


def test_interleaved_of_two_processes_two_stages_each_and_four_micro_batches() -> None:
    """Rank r holds stages r and r + 2; rounds of 2 micro-batches; rank 0 warms up with (2 - 1)·2 + 2·(2 - 1) = 4."""
    expected = {
        0: _staged("0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3"),
        1: _staged("1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3"),
    }
    assert interleaved(2, 2, 4) == orders("interleaved", 4, 2, 4) == expected
    assert _interleaved(2, 2, 4) == expected


def test_gpipe_of_two_stages_and_two_micro_batches() -> None:
    expected = {0: _actions("F0 F1 B0 B1", 0), 1: _actions("F0 F1 B0 B1", 1)}
    assert gpipe(2, 2) == orders("gpipe", 2, 2, 2) == _single(ScheduleGPipe, 2, 2) == expected


# -- our orders on their own ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stages,m", [(2, 1), (2, 4), (4, 2), (4, 8), (8, 32)])
def test_1f1b_keeps_at_most_s_minus_stage_micro_batches_in_flight(stages: int, m: int) -> None:
    for s, actions in one_f_one_b(stages, m).items():
        live = peak = 0
        for a in actions:
            live += 1 if a.kind == "F" else -1
            peak = max(peak, live)
        assert peak == min(m, stages - s)


def test_every_action_once() -> None:
    for schedule, stages, processes in [("gpipe", 4, 4), ("1f1b", 4, 4), ("interleaved", 8, 4)]:
        table = orders(schedule, stages, processes, 8)
        seen = sorted(a for actions in table.values() for a in actions)
        assert seen == sorted(Action(k, s, i) for k in "FB" for s in range(stages) for i in range(8))
        ranks = stage_ranks(schedule, stages, processes)
        for rank, actions in table.items():
            assert all(ranks[a.stage] == rank for a in actions)


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        orders("zero-bubble", 2, 2, 4)
