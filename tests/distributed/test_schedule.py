"""Which schedule runs which layout: the checks made before any process starts, and the stage deal."""

from __future__ import annotations

import pytest

from gpipe_bench.distributed.schedule import check, local_stages


def test_gpipe_and_1f1b_hold_one_stage_per_rank() -> None:
    assert local_stages(4, 2, 4, "gpipe") == [2] and local_stages(4, 2, 4, "1f1b") == [2]
    assert check("gpipe", 4, 4, 1) is None and check("1f1b", 4, 4, 4) is None


def test_interleaved_deals_stages_round_robin() -> None:
    assert [local_stages(8, r, 4, "interleaved") for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert local_stages(8, 0, 2, "interleaved") == [0, 2, 4, 6]
    assert check("interleaved", 8, 4, 8) is None and check("interleaved", 4, 2, 4) is None


@pytest.mark.parametrize(
    "schedule, stages, world, chunks, words",
    [
        ("gpipe", 4, 2, 16, ["4 stage(s) but 2 process(es)", "--nproc 4"]),
        ("1f1b", 2, 2, 1, ["1f1b needs at least as many micro-batches as stages", "chunks 1, stages 2"]),
        ("interleaved", 4, 4, 4, ["at least two stages per process", "4 stage(s) on 4 process(es)", "--nproc 2"]),
        ("interleaved", 8, 3, 6, ["same number on each", "8 stage(s) on 3 process(es)", "--nproc 4"]),
        ("interleaved", 8, 4, 9, ["9 is not a multiple of 2", "--chunks 8 or 4"]),
        ("zero-bubble", 2, 2, 4, ["unknown schedule 'zero-bubble'", "gpipe, 1f1b, interleaved"]),
    ],
)
def test_layouts_a_schedule_cannot_run_say_why_and_what_to_launch(
    schedule: str, stages: int, world: int, chunks: int, words: list
) -> None:
    problem = check(schedule, stages, world, chunks)
    assert problem is not None
    for word in words:
        assert word in problem, problem


def test_the_default_process_count_is_one_per_stage_or_two_stages_each_interleaved() -> None:
    from gpipe_bench.distributed.schedule import check, default_processes

    assert default_processes("gpipe", 4) == default_processes("1f1b", 4) == 4
    assert default_processes("interleaved", 8) == 4 and default_processes("interleaved", 2) == 1
    for schedule in ("gpipe", "1f1b", "interleaved"):  # the default always passes the schedule's own check
        assert check(schedule, 8, default_processes(schedule, 8), 8) is None
