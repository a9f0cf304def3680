"""report/tables.py: the speed, memory and accuracy tables in the published layout, and their notes."""

from __future__ import annotations

import dataclasses

import pytest

from gpipe_bench import report
from gpipe_bench.config import Published, Row
from helpers import EPYC

from .builders import RESNET, amoeba, as_published, blocks, make_table, memory, resnet, result, row_of, speed_rows

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


def test_the_planned_summary_reads_each_records_own_balance() -> None:
    """It used to print the config's balance beside a record that ran another one."""
    rows = speed_rows(RESNET)
    planned = dataclasses.replace(
        rows[2], name="pipeline-2-planned", balance=None, planned=True, published=Published(values={})
    )
    table = make_table("resnet101-speed", rows[:3] + [planned] + rows[3:])
    tuned = result(table, "pipeline-2-planned", 180.0)
    tuned.settings["balance"] = [187, 183]
    base = result(table, "pipeline-2", 150.0)
    base.settings["balance"] = [150, 220]  # the config changed since this record was made
    text = report.speed_table(table, [result(table, "naive-1", 100.0), base, tuned])
    assert "pipeline-2-planned [187,183] / pipeline-2 [150,220] (gpipe-bench): 1.200x." in text


def test_a_run_with_settings_of_its_own_is_shown_apart_from_its_row() -> None:
    rows = speed_rows(RESNET[:1] + [("naive-2", "naive", 2, 4096, 1, (140, 230), "never", None, None)] + RESNET[1:])
    table = make_table("resnet101-speed", rows)
    own = result(table, "pipeline-2", 120.0, overrides={"balance": [192, 178], "checkpoint": "never"})
    results = [result(table, "naive-1", 100.0), result(table, "naive-2", 60.0), result(table, "pipeline-2", 90.0), own]
    text = report.speed_table(table, results)
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    row, apart = lines["pipeline-2"], lines["pipeline-2 [balance 192,178, checkpoint never]"]
    assert "90.000 samples/sec" in row and "137.788" in row and "1.489x" in row  # the row beside its published figures
    assert "120.000 samples/sec" in apart and "1.200x" in apart
    assert "137.788" not in apart and "1.489x" not in apart  # never beside the row's published figures
    assert "0.60 of 1.99x" in apart and "0.60 of 1.49x" in row  # each over its own settings' ideal (no recompute)
    assert (
        "pipeline-2 / naive-2 on the same 2 devices (gpipe-bench): 1.500x; "
        "pipeline-2 [balance 192,178, checkpoint never] / naive-2 on the same 2 devices (gpipe-bench): 2.000x."
    ) in text
    assert "Rows with [settings] ran with settings other than their config row's" in text


def test_render_dispatches_and_rejects_unknown_formats() -> None:
    table = resnet()
    assert report.render(table, as_published(table)) == report.speed_table(table, as_published(table))
    with pytest.raises(ValueError, match="unknown table format"):
        report.speed_table(table, [], fmt="html")


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
    comparison = report.compare(table, results)
    entry = row_of(comparison, "pipeline-8")  # a prediction is not a measurement: never set against the published
    assert entry.flag == "missing" and entry.ours is None and comparison.regressions == []
    assert "- not compared: predictions, not measurements (memory --predict-only): pipeline-8" in comparison.text


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
