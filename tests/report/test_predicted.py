"""report/predicted.py: predicted rows beside the measured records of the same machine and the published figures."""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, List

from gpipe_bench.jobs import Job
from gpipe_bench.predict.hardware import Hardware, Link
from gpipe_bench.predict.rows import RowPrediction
from gpipe_bench.predict.run import TablePrediction
from gpipe_bench.predict.simulate import Outcome
from gpipe_bench.report import predicted
from gpipe_bench.results import Result
from gpipe_bench.timeline.model import Span, Timeline

from .builders import H100, P40, SETTINGS, resnet, result

MIB = 1 << 20
GIB = 1 << 30
#: A second machine whose key also contains "p40": two of the published cards.
TWO_P40 = {**P40, "gpus": ["Tesla P40"] * 2}


def _prediction() -> TablePrediction:
    """naive-1 and pipeline-2 of the published ResNet-101 table, simulated by hand.

    naive-1: 96 samples in 1 s on one busy GPU. pipeline-2: 4096 samples in 32 s; cuda:0 busy
    for 16 of the 32 s, cuda:1 for 24: busiest 75%, bubble 1 - (0.5 + 0.75) / 2 = 37.5%.
    """
    table = resnet()
    rows = {r.name: r for r in table.profiles["published"].rows}
    naive = Job(table, rows["naive-1"], SETTINGS, "published", ["cuda:0"])
    pipeline = Job(table, rows["pipeline-2"], SETTINGS, "published", ["cuda:0", "cuda:1"])
    naive_outcome = Outcome(1.0, Timeline("naive-1", [Span("cuda:0", "forward", 0, 0, 0.0, 1.0)]), ["cuda:0"])
    spans = [Span("cuda:0", "forward", 0, 0, 0.0, 16.0), Span("cuda:1", "backward", 0, 1, 8.0, 32.0)]
    pipeline_outcome = Outcome(32.0, Timeline("pipeline-2", spans), ["cuda:0", "cuda:1"])
    return TablePrediction(
        table,
        "published",
        "p40 preset",
        "p40",
        [
            RowPrediction(naive, naive_outcome, memory=[3 * GIB], speedup=1.0),
            RowPrediction(pipeline, pipeline_outcome, memory=[512 * MIB, 768 * MIB], speedup=128.0 / 96.0),
        ],
    )


def _measured(prediction: TablePrediction) -> List[Result]:
    """Records of the same table: ours on the 8-P40 machine, and others the prediction must not pick."""
    table = prediction.table
    return [
        result(table, "naive-1", 100.0, env=P40),
        result(table, "pipeline-2", 150.0, env=P40),
        result(table, "pipeline-2", 160.0, env=P40, engine="torchgpipe"),  # another engine: not ours
        result(table, "pipeline-2", 999.0, env=H100),  # another machine
        result(table, "pipeline-2", 10.0, env=P40, profile="quick"),  # another profile
    ]


def test_records_set_each_prediction_beside_the_measurement_on_the_named_hardware() -> None:
    prediction = _prediction()
    records = predicted.as_records(prediction, _measured(prediction), "p40")
    assert [r["experiment"] for r in records] == ["naive-1", "pipeline-2"]
    assert records[1] == {
        "experiment": "pipeline-2",
        "throughput": 128.0,  # 4096 samples / 32 s
        "speedup": 128.0 / 96.0,
        "step_seconds": 32.0,
        "bubble": 0.375,
        "busiest_utilisation": 0.75,
        "peak_activation_bytes_per_device": [512 * MIB, 768 * MIB],
        "predicted_reserved_bytes_per_device": None,
        "predicted_allocated_bytes_per_device": None,
        "predicted_reserved_gib": None,
        "predicted_allocated_gib": None,
        "devices": ["cuda:0", "cuda:1"],
        "engine": "gpipe-bench",
        "batch": 4096,
        "chunks": 256,
        "balance": [140, 230],
        "checkpoint": "except_last",
        "measured_throughput": 150.0,
        "measured_speedup": 1.5,  # 150 / 100 on the same machine
        "published_throughput": 137.788,
        "published_speedup": 1.489,
        "costs": "p40 preset",
        "precision": "fp32",
    }
    assert records[0]["throughput"] == 96.0 and records[0]["bubble"] == 0.0 and records[0]["balance"] is None
    assert records[0]["measured_throughput"] == 100.0 and records[0]["measured_speedup"] == 1.0
    # nothing measured on a machine the name does not match: the measured columns are empty
    elsewhere = predicted.as_records(prediction, _measured(prediction), "a100")
    assert [(r["measured_throughput"], r["measured_speedup"]) for r in elsewhere] == [(None, None)] * 2
    assert predicted.measured_for(prediction, _measured(prediction), "h100")["pipeline-2"].value == 999.0


def test_render_writes_the_predicted_table() -> None:
    prediction = _prediction()
    text = predicted.render(prediction, _measured(prediction), "p40")
    lines = text.splitlines()
    assert lines[1].split() == [
        "Experiment",
        "Predicted",
        "Speedup",
        "Bubble",
        "Busiest",
        "device",
        "Peak",
        "activation",
        "/",
        "device",
        "Measured",
        "Measured",
        "speedup",
        "Published",
        "speedup",
    ]
    cells = {line.split()[0]: line.split()[1:] for line in lines[3:-1]}
    assert cells["naive-1"] == [
        "96.000",
        "samples/sec",
        "1.000x",
        "0.0%",
        "100.0%",
        "3.00",
        "GiB",
        "100.000",
        "1.000x",
        "1.000x",
    ]
    assert cells["pipeline-2"] == [
        "128.000",
        "samples/sec",
        "1.333x",
        "37.5%",
        "75.0%",
        "768.0",  # the busiest device's peak, in MiB below 1 GiB
        "MiB",
        "150.000",
        "1.500x",
        "1.489x",
    ]
    # nothing measured, no memory predicted: dashes
    bare = dataclasses.replace(prediction, rows=[dataclasses.replace(prediction.rows[1], memory=None)])
    (line,) = [line for line in predicted.render(bare, [], "p40", fmt="md").splitlines() if "pipeline-2" in line]
    assert [c.strip() for c in line.strip("|").split("|")][5:] == ["–", "–", "–", "1.489x"]
    assert json.loads(predicted.render(prediction, [], "p40", fmt="json"))[1]["bubble"] == 0.375


def test_a_precision_other_than_fp32_heads_the_table() -> None:
    prediction = _prediction()
    assert not predicted.render(prediction, [], "p40").startswith("Precision")  # fp32: PyTorch's defaults
    bf16 = dataclasses.replace(prediction, precision="bf16")
    lines = predicted.render(bf16, [], "p40", fmt="md").splitlines()
    assert lines[0].startswith("Precision: bf16 (autocast") and lines[1] == "" and lines[2].startswith("| Experiment")
    tf32 = predicted.render(dataclasses.replace(prediction, precision="tf32"), [], "p40")
    assert tf32.startswith("Precision: tf32 (convolutions and matrix products in TF32")


def test_measured_throughput_and_speedup_come_from_the_same_machine() -> None:
    """Two machines match the name: the Measured and Measured speedup columns must describe one of them."""
    prediction = _prediction()
    table = prediction.table
    records = [
        result(table, "naive-1", 100.0, env=P40),
        result(table, "pipeline-2", 150.0, env=P40),  # 8x P40: 1.500x
        result(table, "naive-1", 100.0, env=TWO_P40),
        result(table, "pipeline-2", 190.0, env=TWO_P40),  # 2x P40: 1.900x
    ]
    (row,) = [r for r in predicted.as_records(prediction, records, "p40") if r["experiment"] == "pipeline-2"]
    assert (row["measured_throughput"], row["measured_speedup"]) in [(150.0, 1.5), (190.0, 1.9)]


def test_a_prediction_stands_beside_records_of_its_own_precision_only() -> None:
    prediction = _prediction()
    fp32 = _measured(prediction)
    bf16 = dataclasses.replace(prediction, precision="bf16")
    assert [r["measured_throughput"] for r in predicted.as_records(bf16, fp32, "p40")] == [None, None]
    half = [dataclasses.replace(r, settings={**r.settings, "precision": "bf16"}) for r in fp32]
    assert [r["measured_throughput"] for r in predicted.as_records(bf16, half, "p40")] == [100.0, 150.0]
    assert [r["measured_throughput"] for r in predicted.as_records(prediction, half, "p40")] == [None, None]


def test_presets_table_names_rates_memory_and_links_with_sources() -> None:
    def preset(name: str, kind: str, links: Dict[str, Link], default: str) -> Hardware:
        return Hardware(
            name=name,
            description=f"{name}, as tested",
            kind=kind,
            cores=None,
            fp32_flops=12e12,
            tf32_flops=48e12 if kind == "gpu" else None,
            tf32_convs=kind == "gpu",
            memory_bandwidth=900e9,
            memory=16 * GIB,
            launch=5e-6,
            links=links,
            default_link=default,
            sources=(f"https://example.org/{name}",),
        )

    presets = {
        "gpu": preset("gpu", "gpu", {"nvlink": Link("nvlink", 300e9, 1e-5)}, "nvlink"),
        "host": preset("host", "cpu", {"shared": Link("shared", float("inf"), 0.0)}, "shared"),
    }
    lines = predicted.presets_table(presets).splitlines()
    assert lines[1].split() == [
        "Name",
        "fp32",
        "Convolutions",
        "Mixed",
        "precision",
        "Memory",
        "bandwidth",
        "Memory",
        "Kernel",
        "launch",
        "Rates",
        "Between",
        "devices",
    ]
    assert lines[3].split() == [
        "gpu",
        "12.0",
        "TFLOP/s",
        "TF32",
        "48.0",
        "TFLOP/s",
        "–",
        "900",
        "GB/s",
        "16",
        "GiB",
    ] + [
        "5",
        "µs",
        "roofline",
        "nvlink",
        "300",
        "GB/s",
    ]
    assert lines[4].split() == [
        "host",
        "12.0",
        "TFLOP/s",
        "fp32",
        "12.0",
        "TFLOP/s",
        "–",
        "900",
        "GB/s",
        "16",
        "GiB",
    ] + [
        "5",
        "µs",
        "roofline",
        "shared",
        "memory",
    ]
    assert lines[-6:] == [
        "gpu: gpu, as tested",
        "    https://example.org/gpu",
        "host: host, as tested",
        "    https://example.org/host",
        "",
        "Host time per operator beyond the kernel launch is measured where the prediction runs.",
    ]
