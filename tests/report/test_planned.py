"""report/planned.py: `gpipe-bench plan`'s answer as text and JSON, the published configuration beside the plans."""

from __future__ import annotations

import dataclasses
import json
from typing import List, Optional

from gpipe_bench.jobs import Job
from gpipe_bench.predict.plan import Choice, Plan, Planned
from gpipe_bench.predict.rows import RowPrediction
from gpipe_bench.predict.simulate import Outcome
from gpipe_bench.report import planned
from gpipe_bench.timeline.model import Span, Timeline

from .builders import SETTINGS, resnet

GIB = 1 << 30
COMMAND = "gpipe-bench speed resnet101 --profile published --pipeline 2"


def _planned(choice: Choice, seconds: float, busy: float, memory: Optional[List[int]], command: str) -> Planned:
    """A configuration whose step of 256 samples takes ``seconds``, each of two devices busy ``busy`` of it."""
    table = resnet()
    row = dataclasses.replace(table.profiles["published"].rows[2], batch=256, chunks=choice.chunks)
    job = Job(table, row, SETTINGS, "published", ["cuda:0", "cuda:1"])
    spans = [Span(d, "forward", 0, j, 0.0, busy * seconds) for j, d in enumerate(job.devices)]
    spans.append(Span("host", "other", -1, -1, 0.0, seconds, "optimizer"))
    outcome = Outcome(seconds, Timeline("plan", spans), list(job.devices))
    return Planned(choice, RowPrediction(job, outcome), memory, command)


def _plan(engine: str = "gpipe-bench") -> Plan:
    return Plan(
        table=resnet(),
        profile="published",
        model="resnet101",
        devices=["cuda:0", "cuda:1"],
        batch=256,
        engine=engine,
        costs="p40 preset",
        cap=24 * GIB,
        cap_source="the p40 preset's memory",
        plans=[
            _planned(Choice((150, 220), 8, "never"), 1.0, 0.75, [10 * GIB, 12 * GIB], f"{COMMAND} --chunks 8"),
            _planned(Choice((160, 210), 16, "always"), 2.0, 0.5, [6 * GIB, 3 * GIB], f"{COMMAND} --chunks 16"),
        ],
        published=_planned(Choice((140, 230), 16, "except_last"), 4.0, 0.25, [30 * GIB, 20 * GIB], COMMAND),
        baseline=("naive-1", 64.0),
        considered=200,
        simulated=12,
        seconds=1.5,
        notes=["the published configuration exceeds the cap"],
    )


def test_text_names_the_search_then_ranks_the_plans_over_the_published_one() -> None:
    lines = planned.render(_plan()).splitlines()
    assert lines[:6] == [
        "resnet101 on cuda:0,cuda:1, batch 256 (published profile, gpipe-bench engine)",
        "costs: p40 preset",
        "memory cap: 24.00 GiB per device (the p40 preset's memory)",
        "speedup over naive-1: 64.000 samples/sec predicted the same way",
        "200 configurations balanced, 12 simulated, in 1.5 s",
        "",
    ]
    grid = lines[6:13]
    assert grid[1].split() == ["Plan", "Balance", "Chunks", "Checkpoint", "Predicted", "Speedup"] + [
        "Peak",
        "memory",
        "/",
        "device",
        "Bubble",
    ]
    rows = [line.split() for line in grid[3:6]]
    # 256 samples in 1, 2 and 4 s over 64 samples/s; each plan's busiest device's peak; idle share of the step
    assert rows[0] == ["#1", "150,220", "8", "never", "256.000", "samples/sec", "4.000x", "12.00", "GiB", "25.0%"]
    assert rows[1] == ["#2", "160,210", "16", "always", "128.000", "samples/sec", "2.000x", "6.00", "GiB", "50.0%"]
    assert rows[2] == ["published", "140,230", "16", "except_last", "64.000", "samples/sec", "1.000x"] + [
        "30.00",
        "GiB",
        "75.0%",
    ]
    assert lines[14:] == [
        f"#1: {COMMAND} --chunks 8",
        f"#2: {COMMAND} --chunks 16",
        f"published: {COMMAND}",
        "note: the published configuration exceeds the cap",
    ]


def test_a_precision_other_than_fp32_is_in_the_heading() -> None:
    lines = planned.render(dataclasses.replace(_plan(), precision="fp16")).splitlines()
    assert lines[0] == "resnet101 on cuda:0,cuda:1, batch 256 (published profile, gpipe-bench engine, fp16)"
    assert lines[1].startswith("precision: fp16 (autocast: convolutions and matrix products in fp16")
    assert lines[2] == "costs: p40 preset"


def test_json_records_are_the_plans_best_first_then_the_published_configuration() -> None:
    records = json.loads(planned.render(_plan(), fmt="json"))
    assert [(r["rank"], r["published"]) for r in records] == [(1, False), (2, False), (0, True)]
    assert records[0] == {
        "rank": 1,
        "published": False,
        "balance": [150, 220],
        "chunks": 8,
        "checkpoint": "never",
        "schedule": None,  # our engine has checkpoint modes, not schedules
        "processes": None,
        "throughput": 256.0,
        "speedup": 4.0,
        "step_seconds": 1.0,
        "bubble": 0.25,
        "peak_memory_bytes": 12 * GIB,
        "memory_bytes_per_device": [10 * GIB, 12 * GIB],
        "command": f"{COMMAND} --chunks 8",
    }
    assert planned.as_records(dataclasses.replace(_plan(), published=None))[-1]["rank"] == 2


def test_distributed_plans_show_their_schedule_and_stages_per_process() -> None:
    plan = _plan("distributed")
    interleaved = Choice((90, 90, 90, 100), 8, "never", schedule="interleaved", processes=2)
    plan.plans = [_planned(interleaved, 1.0, 0.75, None, "gpipe-bench launch --nproc 2 -- speed resnet101")]
    plan.published = None
    plan.cap = None
    lines = planned.render(plan).splitlines()
    assert lines[0] == "resnet101 on cuda:0,cuda:1, batch 256 (published profile, torch.distributed.pipelining engine)"
    assert lines[2] == "memory cap: none"
    assert lines[7].split()[3] == "Schedule"
    row = lines[9].split()
    assert row[:5] == ["#1", "90,90,90,100", "8", "interleaved", "(2/process)"]
    assert row[-2:] == ["–", "25.0%"]  # peak memory not predicted for torch's pipelining
    (record,) = planned.as_records(plan)
    assert record["schedule"] == "interleaved" and record["processes"] == 2 and record["peak_memory_bytes"] is None
