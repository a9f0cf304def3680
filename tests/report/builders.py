"""What the report tests share: the published speed and memory tables as configs, and records made to order."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from gpipe_bench import report
from gpipe_bench.config import Profile, Published, Row, Settings, Table
from gpipe_bench.results import Result, summarize

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
    overrides: Optional[Dict[str, Any]] = None,
) -> Result:
    """A record of ``experiment`` whose settings are its row's in ``profile`` (as a run records them),
    changed by ``overrides`` as a run given other settings records them."""
    samples = samples if samples is not None else ([] if value is None else [value])
    settings = row_settings(table, experiment, profile)
    if overrides:
        settings.update(overrides, overrides=dict(overrides))
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
        settings=settings,
        environment=dict(env),
        extra=extra or {},
        created=created,
    )


def row_settings(table: Table, experiment: str, profile: str = "published") -> Dict[str, Any]:
    """The settings a run of the row records (``{}`` for a row the profile does not have)."""
    chosen = table.profiles.get(profile)
    row = next((r for r in chosen.rows if r.name == experiment), None) if chosen is not None else None
    if row is None:
        return {}
    return {
        "mode": row.mode,
        "batch": row.batch,
        "chunks": row.chunks,
        "balance": list(row.balance) if row.balance else None,
        "checkpoint": row.checkpoint,
        "precision": row.precision,
    }


def as_published(table: Table, **kwargs: Any) -> List[Result]:
    """The published figures themselves, as if we had measured them."""
    return [
        result(table, row.name, row.published.values["throughput"], **kwargs)
        for row in table.profiles["published"].rows
    ]


def blocks(text: str) -> List[str]:
    return text.strip("\n").split("\n\n")


def row_of(comparison: report.Comparison, experiment: str, engine: str = "gpipe-bench") -> report.CompareRow:
    [entry] = [e for e in comparison.rows if e.experiment == experiment and e.engine == engine and not e.overrides]
    return entry
