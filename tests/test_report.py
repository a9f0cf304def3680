"""Tables in the published layout, speedups per hardware, and the comparison with the published figures."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pytest

from gpipe_bench import report
from gpipe_bench.config import Profile, Published, Row, Settings, Table
from gpipe_bench.results import Result, summarize
from helpers import EPYC

P40 = {
    "devices": ["cuda:0"],
    "device_names": {"cuda:0": "Tesla P40"},
    "gpus": ["Tesla P40"] * 8,
    "hip": None,
    "torch": "1.3.0",
}
H100 = {
    "devices": ["cuda:0"],
    "device_names": {"cuda:0": "NVIDIA H100 80GB HBM3"},
    "gpus": ["NVIDIA H100 80GB HBM3"],
    "hip": None,
    "torch": "2.14.1",
}

# (name, mode, devices, batch, chunks, balance, checkpoint, published throughput, published speedup)
RESNET = [
    ("naive-1", "naive", 1, 96, 1, None, "never", 92.539, 1.000),
    ("pipeline-1", "pipeline", 1, 96, 1, (370,), "always", 69.960, 0.756),
    ("pipeline-2", "pipeline", 2, 4096, 256, (140, 230), "except_last", 137.788, 1.489),
    ("pipeline-4", "pipeline", 4, 4096, 256, (47, 96, 118, 109), "except_last", 243.322, 2.629),
    ("pipeline-8", "pipeline", 8, 4096, 64, (26, 22, 33, 44, 44, 66, 66, 69), "except_last", 404.084, 4.367),
]
AMOEBA = [
    ("naive-2", "naive", 2, 47, 1, (84, 241), "never", 14.188, 1.000),
    ("pipeline-2", "pipeline", 2, 803, 48, (144, 181), "except_last", 20.346, 1.434),
    ("pipeline-4", "pipeline", 4, 378, 32, (78, 77, 92, 78), "except_last", 29.074, 2.049),
    ("pipeline-8", "pipeline", 8, 216, 32, (43, 35, 36, 38, 43, 45, 46, 39), "except_last", 34.392, 2.424),
]
# (name, L, F, parameters, model memory, peak activation)
MEMORY = [
    ("naive-1", 6, 208, "90M", 1.00, None),
    ("pipeline-1", 6, 416, "358M", 4.01, 6.64),
    ("pipeline-2", 6, 544, "613M", 6.45, 11.31),
    ("pipeline-4", 12, 544, "1.16B", 13.00, 18.72),
    ("pipeline-8", 24, 512, "2.01B", 22.42, 35.78),
]
SLIP = "6.45 is the GPipe paper's figure; params x 12 bytes gives 6.85"

SETTINGS = Settings(
    input_size=224,
    dataset_size=50000,
    epochs=10,
    skip_epochs=1,
    optimizer={"name": "sgd", "lr": 0.1},
    classes=10,
    extra={},
)


def make_table(
    name: str,
    rows: Sequence[Row],
    *,
    kind: str = "speed",
    baseline: Optional[str] = None,
    tolerance: float = 0.1,
    quick_rows: Optional[Sequence[Row]] = None,
) -> Table:
    metric, unit, higher = {
        "speed": ("throughput", "samples/sec", True),
        "memory": ("peak_activation_memory", "GiB", False),
        "accuracy": ("top1_error", "%", False),
    }[kind]
    profiles = {
        "published": Profile(
            name="published", description="as published", settings=SETTINGS, rows=tuple(rows), model_args={}
        ),
        "quick": Profile(
            name="quick",
            description="a smoke run",
            settings=SETTINGS,
            rows=tuple(quick_rows if quick_rows is not None else rows),
            model_args={},
        ),
    }
    return Table(
        name=name,
        title=name.replace("-", " "),
        kind=kind,
        metric=metric,
        unit=unit,
        higher_is_better=higher,
        baseline=baseline or rows[0].name,
        model="resnet101",
        model_args={},
        source={"hardware": "8x Tesla P40 (24 GB)"},
        tolerance=tolerance,
        path=f"configs/{name}.yaml",
        profiles=profiles,
    )


def speed_rows(spec: Sequence[Tuple[Any, ...]], **published_overrides: Dict[str, float]) -> List[Row]:
    rows = []
    for name, mode, devices, batch, chunks, balance, checkpoint, tp, speedup in spec:
        values = {"throughput": tp, "speedup": speedup, **published_overrides.get(name.replace("-", "_"), {})}
        rows.append(
            Row(
                name=name,
                mode=mode,
                devices=devices,
                batch=batch,
                chunks=chunks,
                balance=balance,
                checkpoint=checkpoint,
                model_args={},
                published=Published(values=values),
                note="",
            )
        )
    return rows


def resnet(**overrides: Dict[str, float]) -> Table:
    return make_table("resnet101-speed", speed_rows(RESNET, **overrides))


def amoeba() -> Table:
    return make_table("amoebanetd-speed", speed_rows(AMOEBA))


def memory() -> Table:
    rows = [
        Row(
            name=name,
            mode="pipeline" if name != "naive-1" else "naive",
            devices=1 if name.endswith("-1") else int(name.split("-")[1]),
            batch=128,
            chunks=128 if name != "naive-1" else 1,
            balance=None,
            checkpoint="except_last",
            model_args={"num_layers": layers, "num_filters": filters},
            published=Published(values={"parameters": params, "model_memory_gb": mem, "peak_activation_gb": peak}),
            note=SLIP if name == "pipeline-2" else "",
        )
        for name, layers, filters, params, mem, peak in MEMORY
    ]
    return make_table("amoebanetd-memory", rows, kind="memory")


def result(
    table: Table,
    experiment: str,
    value: Optional[float],
    *,
    env: Mapping[str, Any] = P40,
    profile: str = "published",
    engine: str = "gpipe-bench",
    status: str = "ok",
    samples: Optional[List[float]] = None,
    extra: Optional[Dict[str, Any]] = None,
    created: str = "2025-11-28T03:00:00+00:00",
) -> Result:
    samples = samples if samples is not None else ([] if value is None else [value])
    return Result(
        table=table.name,
        experiment=experiment,
        profile=profile,
        engine=engine,
        kind=table.kind,
        metric=table.metric,
        unit=table.unit,
        value=value,
        status=status,
        samples=samples,
        spread=summarize(samples),
        settings={},
        environment=dict(env),
        extra=extra or {},
        created=created,
    )


def as_published(table: Table, **kwargs: Any) -> List[Result]:
    """The published figures themselves, as if we had measured them."""
    return [
        result(table, row.name, row.published.values["throughput"], **kwargs)
        for row in table.profiles["published"].rows
    ]


def blocks(text: str) -> List[str]:
    return text.strip("\n").split("\n\n")


def row_of(comparison: report.Comparison, experiment: str, engine: str = "gpipe-bench") -> report.CompareRow:
    [entry] = [e for e in comparison.rows if e.experiment == experiment and e.engine == engine]
    return entry


# -- speed tables --------------------------------------------------------------------------------------------------

PUBLISHED_RST = """\
==========  ===================  =======
Experiment  Throughput           Speedup
==========  ===================  =======
naive-1      92.539 samples/sec   1.000x
pipeline-1   69.960 samples/sec   0.756x
pipeline-2  137.788 samples/sec   1.489x
pipeline-4  243.322 samples/sec   2.629x
pipeline-8  404.084 samples/sec   4.367x
==========  ===================  ======="""


def test_speed_table_reproduces_the_published_rst_layout() -> None:
    table = resnet()
    heading, grid = blocks(report.speed_table(table, as_published(table), published=False))
    assert grid == PUBLISHED_RST
    assert "8x-nvidia-tesla-p40" in heading and "8× Tesla P40" in heading and "2025-11-28" in heading


def test_speed_table_markdown() -> None:
    table = resnet()
    _, grid = blocks(report.speed_table(table, as_published(table), fmt="md", published=False))
    lines = grid.splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["Experiment", "Throughput", "Speedup"]
    assert "404.084 samples/sec" in lines[-1] and "4.367x" in lines[-1]


def test_speed_table_with_published_columns_and_ideal() -> None:
    table = resnet()
    _, grid = blocks(report.speed_table(table, as_published(table)))
    lines = grid.splitlines()
    assert lines[1].split() == [
        "Experiment",
        "Throughput",
        "Speedup",
        "Published",
        "Published",
        "speedup",
        "Measured",
        "/",
        "ideal",
    ]
    last = lines[-2].split()
    assert last[:3] == ["pipeline-8", "404.084", "samples/sec"]
    assert last[3:] == ["4.367x", "404.084", "4.367x", "0.81", "of", "5.41x"]  # perf.ideal_speedup: 81% of 5.41x
    naive = lines[3].split()
    assert naive[-1] == "–"  # no ideal for a single device


def test_missing_rows_are_dashes_and_failures_say_so() -> None:
    table = resnet()
    results = [
        result(table, "naive-1", 100.0),
        result(table, "pipeline-2", None, status="oom"),
        result(table, "pipeline-4", None, status="interrupted"),
    ]
    _, grid = blocks(report.speed_table(table, results, published=False))
    cells = {line.split()[0]: line.split()[1:] for line in grid.splitlines()[3:-1]}
    assert cells["pipeline-1"] == ["–", "–"]
    assert cells["pipeline-2"] == ["Out", "of", "memory", "–"]
    assert cells["pipeline-4"] == ["interrupted", "–"]
    assert cells["pipeline-8"] == ["–", "–"]


def test_no_results_still_renders_the_rows() -> None:
    text = report.speed_table(resnet(), [])
    assert "no results yet" in text
    assert text.count("–") >= 5 * 2


def test_speedup_uses_the_baseline_of_the_same_hardware() -> None:
    table = resnet()
    results = [
        result(table, "naive-1", 100.0, env=P40),
        result(table, "pipeline-8", 400.0, env=P40),
        result(table, "naive-1", 1000.0, env=H100),
        result(table, "pipeline-8", 1500.0, env=H100),
        result(table, "pipeline-2", 150.0, env=H100),
        result(table, "naive-1", 50.0, env=P40, profile="quick"),  # same machine, other profile: not a baseline
        dataclasses.replace(result(table, "naive-1", 1.0), table="amoebanetd-speed"),  # another table: ignored
    ]
    text = report.speed_table(table, results, published=False)
    parts = blocks(text)
    headings = parts[0::2]
    assert len(parts) == 6  # published on H100, published on P40, quick on P40: published first, then by key
    assert "1x-nvidia-h100-80gb-hbm3 (published profile)" in headings[0]
    assert "8x-nvidia-tesla-p40 (published profile)" in headings[1]
    assert "8x-nvidia-tesla-p40 (quick profile)" in headings[2]
    assert "1× NVIDIA H100 80GB HBM3" in headings[0] and "torch 2.14.1" in headings[0]
    assert "8× Tesla P40" in headings[1] and "torch 1.3.0" in headings[1]
    h100, p40, quick = (
        dict((line.split()[0], line.split()[-1]) for line in grid.splitlines()[3:-1]) for grid in parts[1::2]
    )
    assert p40["pipeline-8"] == "4.000x" and p40["pipeline-2"] == "–"
    assert h100["pipeline-8"] == "1.500x" and h100["pipeline-2"] == "0.150x"
    assert quick["naive-1"] == "1.000x" and quick["pipeline-8"] == "–"


def test_newest_result_wins_and_other_engines_get_their_own_rows() -> None:
    table = resnet()
    results = [
        result(table, "naive-1", 100.0, created="2025-11-27T00:00:00+00:00"),
        result(table, "naive-1", 200.0, created="2025-11-28T00:00:00+00:00"),
        result(table, "pipeline-2", 300.0, created="2025-11-29T00:00:00+00:00"),
        result(table, "naive-1", 80.0, engine="torchgpipe"),
        result(table, "pipeline-2", 160.0, engine="torchgpipe"),
    ]
    heading, grid = blocks(report.speed_table(table, results, published=False))
    assert "2025-11-28 to 2025-11-29" in heading  # the replaced 11-27 record is gone
    names = [line[: line.index("  ")] for line in grid.splitlines()[3:-1]]
    assert names == [
        "naive-1",
        "naive-1 (torchgpipe)",
        "pipeline-1",
        "pipeline-2",
        "pipeline-2 (torchgpipe)",
        "pipeline-4",
        "pipeline-8",
    ]
    speedups = [line.split()[-1] for line in grid.splitlines()[3:-1]]
    assert speedups[3:5] == ["1.500x", "2.000x"]  # 300 / 200 ours, 160 / 80 torchgpipe's


def test_plain_model_baseline_is_shared_by_engines() -> None:
    """naive-1 is the plain model whatever engine recorded it; torchgpipe rows may use ours."""
    table = resnet()
    results = [result(table, "naive-1", 100.0), result(table, "pipeline-2", 150.0, engine="torchgpipe")]
    _, grid = blocks(report.speed_table(table, results, published=False))
    assert "pipeline-2 (torchgpipe)  150.000 samples/sec   1.500x" in grid


def test_pipeline_over_naive_on_the_same_devices_per_engine() -> None:
    rows = speed_rows(RESNET[:1] + [("naive-2", "naive", 2, 96, 1, (140, 230), "never", None, None)] + RESNET[1:])
    table = make_table("resnet101-speed", rows)
    results = [
        result(table, "naive-1", 100.0),
        result(table, "naive-2", 60.0),
        result(table, "pipeline-2", 90.0),
        result(table, "naive-2", 50.0, engine="distributed-gpipe", extra={"processes": 2}),
        result(table, "pipeline-2", 70.0, engine="distributed-gpipe", extra={"processes": 2}),
    ]
    note = blocks(report.speed_table(table, results))[-1]
    assert note == (
        "Pipelining over the same devices: pipeline-2 / naive-2 on the same 2 devices (gpipe-bench): 1.500x; "
        "pipeline-2 / naive-2 on the same 2 processes (distributed-gpipe): 1.400x."
    )
    # where naive-N is the baseline, the Speedup column already says it: no note
    amoeba_table = amoeba()
    text = report.speed_table(
        amoeba_table, [result(amoeba_table, "naive-2", 10.0), result(amoeba_table, "pipeline-2", 15.0)]
    )
    assert "Pipelining over the same devices" not in text


def test_render_dispatches_and_rejects_unknown_formats() -> None:
    table = resnet()
    assert report.render(table, as_published(table)) == report.speed_table(table, as_published(table))
    with pytest.raises(ValueError, match="unknown table format"):
        report.speed_table(table, [], fmt="html")


# -- memory and accuracy -------------------------------------------------------------------------------------------


def test_memory_table() -> None:
    table = memory()
    results = [
        result(table, "naive-1", None, status="oom", extra={"parameters": 89_745_302, "model_memory_gib": 1.003}),
        result(table, "pipeline-2", 11.5, extra={"parameters": 612_770_042, "model_memory_gib": 6.848}),
    ]
    _, grid = blocks(report.render(table, results))
    lines = grid.splitlines()
    assert "Total Model Parameter Memory" in lines[1] and "Total Peak Activation Memory" in lines[1]
    naive = lines[3]
    assert naive.startswith("naive-1     (6, 208)") and "90M" in naive and "1.00 GiB" in naive
    assert "Out of memory" in naive and naive.rstrip().endswith("--")
    assert "613M" in lines[5] and "6.85 GiB" in lines[5] and "11.50 GiB" in lines[5] and "6.45GB" in lines[5]
    assert lines[6].startswith("pipeline-4  (12, 544)")


def test_memory_table_shows_predictions_and_units() -> None:
    table = memory()
    measured = {
        "parameters": 358_456_186,
        "model_memory_gib": 4.006,
        "predicted_gib": 3.1,
        "devices": ["cuda:0"],
        "model_memory_per_device_gib": [4.006],
        "predicted_per_device_gib": [3.1],
        "measured_per_device_gib": [3.0],
        "predicted_peak_at": ["backward 126 on partition 0"],
        "method": "CUDA max_memory_reserved minus model memory",
    }
    sized = {
        "parameters": 2_005_905_418,
        "model_memory_gib": 22.42,
        "predicted_gib": 18.96,
        "devices": ["cuda:0", "cuda:1"],
        "model_memory_per_device_gib": [11.0, 11.42],
        "predicted_per_device_gib": [9.0, 9.96],
        "predicted_peak_at": ["backward 126 on partition 0"] * 2,
    }
    results = [
        result(table, "pipeline-1", 3.0, extra=measured),
        result(table, "pipeline-8", None, status="predicted", extra=sized),
    ]
    text = report.render(table, results)
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("pipeline-")}
    assert "3.00 GiB" in lines["pipeline-1"] and "3.10 GiB" in lines["pipeline-1"]
    assert "not measured" in lines["pipeline-8"] and "18.96 GiB" in lines["pipeline-8"]
    assert "CUDA max_memory_reserved minus model memory" in text  # the method of the measured rows, said once
    per_device = report.memory_per_device(table, results)
    assert "cuda:1" in per_device and "9.96 GiB" in per_device and "backward 126 on partition 0" in per_device
    entry = row_of(report.compare(table, results), "pipeline-8")
    assert entry.flag == "differs" and "predicted (not measured)" in entry.note  # never a regression


def test_cuda_memory_rows_show_the_allocated_peak_and_the_prediction_against_it() -> None:
    """The measured column stays reserved; the allocated peak is shown per device, and the ratio is against it."""
    table = memory()
    cuda = {
        "parameters": 612_770_042,
        "model_memory_gib": 6.848,
        "predicted_gib": 5.7,
        "devices": ["cuda:0", "cuda:1"],
        "model_memory_per_device_gib": [3.4, 3.448],
        "predicted_per_device_gib": [3.0, 2.7],
        "measured_per_device_gib": [3.5, 3.1],
        "allocated_per_device_gib": [3.1, 2.9],
        "allocated_gib": 6.0,
        "predicted_over_measured": 0.95,
        "predicted_compared_with": "CUDA max_memory_allocated minus model memory",
        "predicted_peak_at": ["backward 126 on partition 0", "backward 127 on partition 1"],
        "method": "CUDA max_memory_reserved minus model memory",
    }
    results = [result(table, "pipeline-2", 6.6, extra=cuda)]
    text = report.render(table, results)
    line = next(line for line in text.splitlines() if line.startswith("pipeline-2"))
    assert "6.60 GiB" in line and "5.70 GiB" in line and "0.950" in line
    assert "Predicted / measured: the prediction over CUDA max_memory_allocated minus model memory" in text
    per_device = report.memory_per_device(table, results)
    header = next(line for line in per_device.splitlines() if line.startswith("Experiment"))
    assert header.split()[:6] == ["Experiment", "Device", "Model", "memory", "Peak", "activation"]
    assert "Allocated" in header and header.index("Allocated") < header.index("Predicted")
    rows = [line for line in per_device.splitlines() if "cuda:" in line]
    assert "3.50 GiB" in rows[0] and "3.10 GiB" in rows[0] and "3.00 GiB" in rows[0]
    assert "3.10 GiB" in rows[1] and "2.90 GiB" in rows[1] and "2.70 GiB" in rows[1]


def test_cpu_memory_rows_have_one_measured_figure() -> None:
    table = memory()
    cpu = {
        "parameters": 612_770_042,
        "model_memory_gib": 6.848,
        "predicted_gib": 5.7,
        "devices": ["cpu:0"],
        "model_memory_per_device_gib": [6.848],
        "predicted_per_device_gib": [5.7],
        "measured_per_device_gib": [6.0],
        "predicted_over_measured": 0.95,
        "predicted_compared_with": "bytes held by tensors (TensorMemory), model state excluded",
        "method": "bytes held by tensors (TensorMemory), model state excluded",
    }
    results = [result(table, "pipeline-2", 6.0, extra=cpu, env=EPYC)]
    assert "Allocated" not in report.memory_per_device(table, results)
    assert "0.950" in report.render(table, results)


def test_format_gib_switches_to_mib_below_one_gib() -> None:
    assert report.format_gib(6.85) == "6.85 GiB"
    assert report.format_gib(0.0248) == "25.4 MiB"
    assert report.format_gib(None) == "–"


def test_accuracy_table() -> None:
    rows = [
        Row(
            name=name,
            mode=mode,
            devices=devices,
            batch=batch,
            chunks=chunks,
            balance=None,
            checkpoint="except_last",
            model_args={},
            published=Published(values={"top1_error": err, "top1_error_std": std}),
            note="",
        )
        for name, mode, devices, batch, chunks, err, std in [
            ("dataparallel-256", "dataparallel", 2, 256, 1, 22.02, 0.11),
            ("pipeline-256", "pipeline", 2, 256, 4, 21.99, 0.13),
        ]
    ]
    table = make_table("resnet101-accuracy", rows, kind="accuracy")
    results = [result(table, "dataparallel-256", 22.02, samples=[21.91, 22.02, 22.13])]
    _, grid = blocks(report.render(table, results))
    lines = grid.splitlines()
    assert lines[1].split() == ["Experiment", "Top-1", "error", "(%)", "Published"]
    assert lines[3].split() == ["dataparallel-256", "22.02±0.11", "22.02±0.11"]
    assert lines[4].split() == ["pipeline-256", "–", "21.99±0.13"]


def test_compare_measured_over_ideal_with_31_microbatches() -> None:
    table = amoeba()
    comparison = report.compare(table, as_published(table))
    entry = row_of(comparison, "pipeline-8")
    ideal = 8 * 31 / 38 * 0.75
    assert entry.micro_batches == 31
    assert entry.ideal == pytest.approx(ideal)
    assert entry.speedup == pytest.approx(34.392 / 14.188)
    assert entry.of_ideal == pytest.approx(34.392 / 14.188 / ideal)
    assert entry.published_of_ideal == pytest.approx(2.424 / ideal)
    assert row_of(comparison, "naive-2").ideal is None
    assert f"0.50 of {ideal:.2f}x" in comparison.text


# -- compare -------------------------------------------------------------------------------------------------------


def test_compare_flags_by_tolerance() -> None:
    table = resnet()  # tolerance 10%
    results = [
        result(table, "naive-1", 100.0),
        result(table, "pipeline-2", 100.0 * 1.489 * 0.95),  # 5% slower than published: ok
        result(table, "pipeline-4", 100.0 * 2.629 * 0.8),  # 20% slower: regression
        result(table, "pipeline-8", 100.0 * 4.367 * 1.2),  # 20% faster: better
    ]
    comparison = report.compare(table, results)
    flags = {e.experiment: e.flag for e in comparison.rows}
    assert flags == {
        "naive-1": "ok",
        "pipeline-1": "missing",
        "pipeline-2": "ok",
        "pipeline-4": "regression",
        "pipeline-8": "better",
    }
    assert row_of(comparison, "pipeline-4").ratio == pytest.approx(0.8)
    assert len(comparison.regressions) == 1 and "pipeline-4" in comparison.regressions[0]
    assert "\n" not in comparison.regressions[0]
    flag_lines = comparison.text.split("Flags:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(flag_lines) == 3
    assert any("pipeline-1 [missing]" in line for line in flag_lines)
    assert any("pipeline-4 [regression]" in line and "2.103x vs published 2.629x" in line for line in flag_lines)
    assert any("pipeline-8 [better]" in line for line in flag_lines)


def test_compare_quick_profile_differs_but_never_regresses() -> None:
    """Scaled-down rows on other hardware are reported, not failed by `compare --check`."""
    table = resnet()
    results = [
        result(table, "naive-1", 100.0, profile="quick"),
        result(table, "pipeline-4", 100.0 * 2.629 * 0.5, profile="quick"),
    ]
    comparison = report.compare(table, results)
    assert row_of(comparison, "pipeline-4").flag == "differs"
    assert comparison.regressions == []
    assert "not comparable with the published hardware" in comparison.text


def test_compare_lower_is_better_and_failed_runs() -> None:
    table = memory()  # peak activation memory: lower is better
    results = [
        result(table, "naive-1", None, status="oom"),  # nothing published either: ok
        result(table, "pipeline-1", 6.64 * 1.5),  # 50% more memory: regression
        result(table, "pipeline-2", 11.31 * 0.5),  # half: better
        result(table, "pipeline-4", None, status="oom"),  # published a figure, we ran out: regression
        result(table, "pipeline-8", None, status="error"),
    ]
    comparison = report.compare(table, results)
    flags = {e.experiment: e.flag for e in comparison.rows}
    assert flags == {
        "naive-1": "ok",
        "pipeline-1": "regression",
        "pipeline-2": "better",
        "pipeline-4": "regression",
        "pipeline-8": "missing",
    }
    assert row_of(comparison, "pipeline-8").note == "run error"


def test_compare_without_a_baseline_is_missing_not_ok() -> None:
    table = resnet()
    entry = row_of(report.compare(table, [result(table, "pipeline-2", 150.0)]), "pipeline-2")
    assert entry.flag == "missing" and "baseline naive-1" in entry.note


def test_compare_with_no_results_lists_every_row_missing() -> None:
    comparison = report.compare(resnet(), [])
    assert [e.flag for e in comparison.rows] == ["missing"] * 5
    assert comparison.regressions == []


def test_published_seed_speed_tables_are_consistent() -> None:
    for table in (resnet(), amoeba()):
        comparison = report.compare(table, as_published(table))
        assert comparison.inconsistencies == []
        assert comparison.regressions == []
        assert {e.flag for e in comparison.rows} == {"ok"}
        assert "Published data:\n- consistent" in comparison.text


def test_published_speedup_that_does_not_follow_the_throughputs_is_reported() -> None:
    table = resnet(pipeline_4={"speedup": 2.700})
    comparison = report.compare(table, [])
    assert len(comparison.inconsistencies) == 1
    line = comparison.inconsistencies[0]
    assert "pipeline-4" in line and "2.700x" in line and "243.322 / baseline naive-1 92.539 = 2.629x" in line
    assert line in comparison.text


def test_published_rounding_is_not_an_inconsistency() -> None:
    # 1.511 / 2.000 = 0.7555: a printed 0.755 and 0.756 both follow from the printed throughputs; 0.757 does not.
    def slips(speedup: float) -> List[str]:
        table = resnet(naive_1={"throughput": 2.0}, pipeline_1={"throughput": 1.511, "speedup": speedup})
        return [line for line in report.compare(table, []).inconsistencies if " pipeline-1:" in line]

    assert slips(0.755) == [] and slips(0.756) == []
    assert len(slips(0.757)) == 1 and slips(0.754) != []


def test_published_model_memory_slip_is_flagged() -> None:
    comparison = report.compare(memory(), [])
    assert len(comparison.inconsistencies) == 1
    line = comparison.inconsistencies[0]
    assert "pipeline-2" in line and "6.45GB" in line and "6.85 GiB" in line and SLIP in line
    assert line in comparison.text
    # The rule itself, for the record: 613M x 4 bytes x 3 in GiB.
    assert 613e6 * 12 / 2**30 == pytest.approx(6.85, abs=0.005)


def test_parameter_counts_that_differ_from_the_published_are_noted() -> None:
    table = memory()
    results = [result(table, "pipeline-1", 6.64, extra={"parameters": 300_000_000})]
    entry = row_of(report.compare(table, results), "pipeline-1")
    assert "300,000,000 parameters, published 358M" in entry.note
    ok = [result(table, "pipeline-1", 6.64, extra={"parameters": 358_456_186})]
    assert "parameters" not in row_of(report.compare(table, ok), "pipeline-1").note


def test_compare_markdown_and_text_layout() -> None:
    table = resnet()
    comparison = report.compare(table, as_published(table), fmt="md")
    assert "| Experiment" in comparison.text
    assert comparison.text.endswith("\n") and not math.isnan(row_of(comparison, "pipeline-8").ratio)


def test_results_of_a_profile_the_config_lost_are_named_not_dropped() -> None:
    table = resnet()
    text = report.speed_table(table, [result(table, "naive-1", 1.0, profile="old")])
    assert "profile 'old' is not in configs/resnet101-speed.yaml" in text
    assert "profile 'old'" in report.compare(table, [result(table, "naive-1", 1.0, profile="old")]).text


def test_the_newer_record_of_a_row_wins_by_time_not_by_text() -> None:
    """The newest record was chosen by comparing 'created' strings: wrong across time zones and DST."""
    table = make_table("resnet101-speed", speed_rows(RESNET))
    # 02:10 at UTC+02:00 is 00:10 UTC: older than 01:30 UTC, although its text sorts later.
    older = result(table, "pipeline-8", 111.0, created="2026-03-29T02:10:00+0200")
    newer = result(table, "pipeline-8", 222.0, created="2026-03-29T01:30:00+00:00")
    for records in ([older, newer], [newer, older]):
        text = report.render(table, records + [result(table, "naive-1", 100.0)])
        assert "222.000" in text and "111.000" not in text


def test_a_planned_row_is_set_against_the_published_one_it_was_planned_beside() -> None:
    rows = speed_rows(RESNET)
    planned = dataclasses.replace(
        rows[2], name="pipeline-2-planned", balance=None, planned=True, published=Published(values={})
    )
    table = make_table("resnet101-speed", rows[:3] + [planned] + rows[3:])
    tuned = result(table, "pipeline-2-planned", 180.0)
    tuned.settings["balance"] = [170, 200]
    results = [result(table, "naive-1", 100.0), result(table, "pipeline-2", 150.0), tuned]
    text = report.speed_table(table, results)
    assert "Planned balance against the published one: pipeline-2-planned [170,200] / pipeline-2 [140,230] " in text
    assert "(gpipe-bench): 1.200x." in text
    assert "pipeline-2-planned  180.000 samples/sec   1.800x" in text
