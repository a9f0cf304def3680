"""Our action orders against torch.distributed.pipelining's own schedule tables."""

from typing import Dict, List, Optional

import pytest
from torch.distributed.pipelining import schedules as torch_schedules

from gpipe_bench.predict.orders import Action, gpipe, interleaved, one_f_one_b, orders, stage_ranks


def _theirs(table: Dict[int, List[Optional[object]]]) -> Dict[int, List[Action]]:
    """torch's pipeline_order without idle slots or gradient reductions, as our Actions."""
    out: Dict[int, List[Action]] = {}
    for rank, actions in table.items():
        kept = []
        for a in actions:
            if a is None:
                continue
            kind = str(a.computation_type)
            if kind.endswith("FORWARD") and "BACKWARD" not in kind or kind == "F":
                kept.append(Action("F", a.stage_index, a.microbatch_index))
            elif "FULL_BACKWARD" in kind or kind == "B":
                kept.append(Action("B", a.stage_index, a.microbatch_index))
        out[rank] = kept
    return out


def _single(cls: type, stages: int, m: int) -> Dict[int, List[Action]]:
    schedule = object.__new__(cls)
    schedule._num_stages = stages  # type: ignore[attr-defined]
    schedule._n_microbatches = m  # type: ignore[attr-defined]
    return _theirs(schedule._get_pipeline_order())  # type: ignore[attr-defined]


@pytest.mark.parametrize("stages,m", [(2, 1), (2, 4), (4, 8), (8, 32)])
def test_gpipe_order_is_torchs(stages: int, m: int) -> None:
    assert gpipe(stages, m) == _single(torch_schedules.ScheduleGPipe, stages, m)


@pytest.mark.parametrize("stages,m", [(2, 2), (2, 4), (4, 4), (4, 8), (8, 32)])
def test_1f1b_order_is_torchs(stages: int, m: int) -> None:
    ours = one_f_one_b(stages, m)
    theirs = _single(torch_schedules.Schedule1F1B, stages, m)
    # torch's table (used for its visualisations) numbers the last stage's forwards from 1; what its
    # _step_microbatches runs there is F0 B0 F1 B1 ...: the rule min(M, S - s) warm-up forwards holds on every stage.
    assert {s: a for s, a in ours.items() if s < stages - 1} == {s: a for s, a in theirs.items() if s < stages - 1}
    last = stages - 1
    assert ours[last] == [Action(k, last, i) for i in range(m) for k in "FB"]
    # in flight on stage s: at most S - s micro-batches forwarded and not yet backwarded
    for s, actions in ours.items():
        live = peak = 0
        for a in actions:
            live += 1 if a.kind == "F" else -1
            peak = max(peak, live)
        assert peak == min(m, stages - s)


@pytest.mark.parametrize("processes,local,m", [(2, 2, 4), (2, 4, 8), (4, 2, 8), (2, 2, 6)])
def test_interleaved_order_is_torchs(processes: int, local: int, m: int) -> None:
    schedule = object.__new__(torch_schedules.ScheduleInterleaved1F1B)
    schedule.pp_group_size = processes  # type: ignore[attr-defined]
    schedule.n_local_stages = local  # type: ignore[attr-defined]
    schedule._n_microbatches = m  # type: ignore[attr-defined]
    schedule.number_of_rounds = max(1, m // processes)  # type: ignore[attr-defined]
    schedule.microbatches_per_round = m // schedule.number_of_rounds  # type: ignore[attr-defined]
    theirs = _theirs({r: schedule._calculate_single_rank_operations(r) for r in range(processes)})
    assert interleaved(processes, local, m) == theirs


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
