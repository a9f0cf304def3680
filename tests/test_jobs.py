"""jobs.py: from the options a user gives to resolved jobs, every choice made before anything runs."""

from __future__ import annotations

from dataclasses import replace
from typing import List, Tuple

import pytest
import torch

from gpipe_bench import config, jobs
from gpipe_bench.config import Overrides
from gpipe_bench.errors import HarnessError

SPEED = config.load("resnet101-speed")
MEMORY = config.load("amoebanetd-memory")


def test_partitions_is_one_rule_for_every_table() -> None:
    rows = {r.name: r for r in SPEED.profile("published").rows}
    assert jobs.partitions(rows["naive-1"]) == 1
    assert jobs.partitions(rows["naive-2"]) == 2
    assert jobs.partitions(rows["pipeline-8"]) == 8
    unbalanced = replace(MEMORY.row("pipeline-4"), balance=None)
    assert jobs.partitions(unbalanced) == 4  # a memory row finds its balance later, over its devices


def test_naive_n_is_the_split_model_in_every_table() -> None:
    """naive-N meant a split model in speed rows but the plain model in memory rows."""
    naive2 = replace(MEMORY.row("naive-1"), name="naive-2", devices=2, balance=(100, 225))
    job = jobs.Job(MEMORY, naive2, MEMORY.profile("published").settings, "published", ["cpu:0", "cpu:1"])
    assert job.split
    plain = jobs.Job(MEMORY, MEMORY.row("naive-1"), MEMORY.profile("published").settings, "published", ["cpu"])
    assert not plain.split
    row = SPEED.row("naive-2")
    assert jobs.Job(SPEED, row, SPEED.profile("published").settings, "published", ["cpu:0", "cpu:1"]).split


def test_default_profile_and_its_note() -> None:
    assert jobs.default_profile(None, cuda=True) == ("published", "")
    profile, note = jobs.default_profile(None, cuda=False)
    assert profile == "quick" and "No CUDA device" in note
    assert jobs.default_profile("published", cuda=False) == ("published", "")


def test_pick_rows() -> None:
    rows, named = jobs.pick_rows(SPEED, "quick", pipeline=2)
    assert [r.name for r in rows] == ["pipeline-2"] and named
    rows, named = jobs.pick_rows(SPEED, "quick")
    assert len(rows) == 7 and not named  # the published six and pipeline-2-planned
    with pytest.raises(HarnessError, match="--pipeline and --naive both name a row"):
        jobs.pick_rows(SPEED, "quick", pipeline=2, naive=1)


def test_plan_resolves_every_row_before_any_runs() -> None:
    asked: List[str] = []

    def planner(job: jobs.Job) -> Tuple[jobs.Job, str]:
        asked.append(job.row.name)
        return replace(job, row=replace(job.row, balance=(185, 185))), "planned by the test"

    rows = list(SPEED.profile("quick").rows)
    planned = jobs.resolve(SPEED, "quick", rows, Overrides(epochs=2), None, planner=planner)
    assert [job.row.name for job, _ in planned] == [r.name for r in rows]
    for job, _ in planned:
        assert len(job.devices) == jobs.partitions(job.row) and job.settings.epochs == 2
    # The planner is asked for the planned rows only, once their devices are known; the note says how.
    assert asked == [r.name for r in rows if r.planned] and asked
    [(job, note)] = [(j, n) for j, n in planned if j.row.planned]
    assert job.row.balance == (185, 185) and "planned by the test" in note
    with pytest.raises(ValueError, match="no planner"):
        jobs.resolve(SPEED, "quick", rows, Overrides(), None)
    with pytest.raises(HarnessError, match="2 partitions"):
        jobs.resolve(SPEED, "quick", [SPEED.row("pipeline-2", "quick")], Overrides(), "cpu:0")


def test_predict_only_devices() -> None:
    row = MEMORY.row("pipeline-4")
    [(job, _)] = jobs.resolve(MEMORY, "published", [row], Overrides(), None, predict_only=True)
    assert list(job.devices) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    [(job, _)] = jobs.resolve(
        MEMORY, "quick", [MEMORY.row("pipeline-4", "quick")], Overrides(), None, predict_only=True
    )
    assert list(job.devices) == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    with pytest.raises(HarnessError, match="1 device"):
        jobs.resolve(MEMORY, "published", [row], Overrides(), "cuda:0", predict_only=True)


def test_distributed_needs_a_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(HarnessError, match="gpipe-bench launch --nproc N"):
        jobs.resolve_distributed(
            SPEED, "quick", [SPEED.row("pipeline-2", "quick")], Overrides(), named=True, schedule="gpipe", timeout_s=10
        )


def test_distributed_rows_that_fit_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rows = list(SPEED.profile("quick").rows)
    planned, notes = jobs.resolve_distributed(
        SPEED, "quick", rows, Overrides(), named=False, schedule="gpipe", timeout_s=10
    )
    assert [j.row.name for j in planned] == ["naive-2", "pipeline-2"]
    assert notes == [
        "pipeline-2-planned: skipped: its balance is planned (run it with --balance from gpipe-bench plan)"
    ]
    assert all(j.record_engine == "distributed-gpipe" and j.timeout_s == 10 for j in planned)
    with pytest.raises(HarnessError, match="pipeline-4: 4 stage"):
        jobs.resolve_distributed(
            SPEED, "quick", [SPEED.row("pipeline-4", "quick")], Overrides(), named=True, schedule="gpipe", timeout_s=10
        )


def test_steps_per_epoch_refuses_an_empty_epoch() -> None:
    row = SPEED.row("naive-1", "quick")
    settings = replace(SPEED.profile("quick").settings, dataset_size=8)
    with pytest.raises(HarnessError, match="smaller than the batch"):
        jobs.Job(SPEED, row, settings, "quick", ["cpu"]).steps_per_epoch()


def test_a_job_reads_its_kinds_settings_typed() -> None:
    """A row's kind settings are attributes with their types and defaults; another kind's are a bug, said plainly."""
    quick = MEMORY.profile("quick").settings
    job = jobs.Job(MEMORY, MEMORY.row("pipeline-2", "quick"), quick, "quick", ["cpu:0", "cpu:1"])
    assert job.memory_settings == config.MemorySettings.from_extra(quick.extra, MEMORY.path)
    assert (job.memory_settings.parameter_copies, job.memory_settings.bytes_per_parameter) == (3, 4)
    changed = replace(job, settings=replace(quick, extra={**quick.extra, "parameter_copies": 2}))
    assert changed.memory_settings.parameter_copies == 2  # read from the job's own settings, after any change
    accuracy = config.load("resnet101-accuracy")
    row = accuracy.row("pipeline-256", "quick")
    recipe = jobs.Job(accuracy, row, accuracy.profile("quick").settings, "quick", ["cpu"]).accuracy_settings
    assert recipe.memory_format == "channels_last" and recipe.lr_milestones == (0.6, 0.85)
    with pytest.raises(TypeError, match="amoebanetd-memory is a memory table: only accuracy tables have"):
        _ = job.accuracy_settings
    speed = jobs.Job(SPEED, SPEED.row("naive-1"), SPEED.profile("quick").settings, "quick", ["cpu"])
    with pytest.raises(TypeError, match="resnet101-speed is a speed table"):
        _ = speed.memory_settings


def test_a_registered_model_without_a_speed_table_has_its_plain_model() -> None:
    table = jobs.table_for("resnet50", "speed", plain=True)
    assert table.model == "resnet50" and table.kind == "speed"
    [row] = table.profile("published").rows
    assert (row.name, row.mode, row.devices, row.batch, row.balance) == ("naive-1", "naive", 1, 128, None)
    assert table.profile("published").settings.classes == 1000
    with pytest.raises(HarnessError, match="no speed table"):
        jobs.table_for("resnet50", "speed")
    with pytest.raises(HarnessError, match="no model 'nosuch'.*resnet50"):
        jobs.table_for("nosuch", "speed", plain=True)
    assert jobs.table_for("resnet101", "speed", plain=True).name == "resnet101-speed"


# -- precision -----------------------------------------------------------------------------------------------------


def test_a_rows_precision_is_fp32_unless_overridden_and_every_record_says_it() -> None:
    assert all(r.precision == "fp32" for r in SPEED.profile("published").rows)
    row = SPEED.row("pipeline-2", "quick")
    ((job, _),) = jobs.resolve(SPEED, "quick", [row], Overrides(precision="bf16"), "cpu:0,cpu:1")
    assert job.row.precision == "bf16" and job.device_type == "cpu"
    assert job.settings_record()["precision"] == "bf16"


def test_a_precision_the_rows_devices_cannot_run_is_refused_before_anything_runs() -> None:
    row = SPEED.row("pipeline-2", "quick")
    for name in ("fp16", "tf32"):
        with pytest.raises(
            HarnessError, match=f"pipeline-2: a CPU cannot run --precision {name}.*use one of: fp32, bf16"
        ):
            jobs.resolve(SPEED, "quick", [row], Overrides(precision=name), "cpu:0,cpu:1")
    # Sized for GPUs without running: any precision a GPU runs.
    ((job, _),) = jobs.resolve(
        SPEED, "published", [SPEED.row("pipeline-2")], Overrides(precision="fp16"), None, predict_only=True
    )
    assert job.device_type == "cuda" and job.row.precision == "fp16"


def test_torchgpipe_would_run_autocast_rows_in_fp32_so_they_are_refused() -> None:
    row = SPEED.row("pipeline-2", "quick")
    with pytest.raises(HarnessError, match="torchgpipe 0.0.7's workers do not take the caller's autocast"):
        jobs.resolve(SPEED, "quick", [row], Overrides(precision="bf16"), "cpu:0,cpu:1", engine="torchgpipe")
    # The plain model (nothing split) and fp32 are fine.
    plain = SPEED.row("naive-1", "quick")
    jobs.resolve(SPEED, "quick", [plain], Overrides(precision="bf16"), "cpu:0", engine="torchgpipe")


def test_fp16_under_torchs_pipelining_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # ranks on GPUs, which run fp16
    with pytest.raises(HarnessError, match="fp16 needs one loss scale agreed by every stage"):
        jobs.resolve_distributed(
            SPEED,
            "quick",
            [SPEED.row("pipeline-2", "quick")],
            Overrides(precision="fp16"),
            named=True,
            schedule="gpipe",
            timeout_s=10,
        )
    planned, _ = jobs.resolve_distributed(
        SPEED,
        "quick",
        [SPEED.row("pipeline-2", "quick")],
        Overrides(precision="bf16"),
        named=True,
        schedule="gpipe",
        timeout_s=10,
    )
    assert planned[0].row.precision == "bf16"


def test_a_job_knows_what_the_command_line_changed_of_its_row() -> None:
    row = SPEED.row("pipeline-2", "quick")
    [(job, _)] = jobs.resolve(SPEED, "quick", [row], Overrides(balance=(192, 178), chunks=4), "cpu:0,cpu:1")
    assert job.overrides == {"balance": [192, 178]}
    assert job.settings_record()["overrides"] == {"balance": [192, 178]}
    [(plain, _)] = jobs.resolve(SPEED, "quick", [row], Overrides(batch=row.batch), "cpu:0,cpu:1")
    assert plain.overrides == {} and "overrides" not in plain.settings_record()


def test_partitions_sharing_a_device_are_not_the_rows_devices() -> None:
    row = SPEED.row("pipeline-2", "quick")
    [(job, _)] = jobs.resolve(SPEED, "quick", [row], Overrides(), "cpu:0*2")
    assert job.overrides == {"devices": 1}


def test_model_uses_follow_the_tables_and_predicts_plain_rule() -> None:
    assert jobs.model_uses("resnet101") == "for speed, accuracy, predict, plan"
    assert jobs.model_uses("resnet50") == "for predict (its plain model, naive-1)"  # no table: its plain model
