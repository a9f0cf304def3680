"""The per-device memory plot: a PNG for measured, predicted-only and out-of-memory rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from gpipe_bench import config
from gpipe_bench.results import Result
from helpers import accuracy_record

pytest.importorskip("matplotlib")
from gpipe_bench.plot import memory_plot  # noqa: E402

TABLE = config.load("amoebanetd-memory")
ENV = {"cpu_model": "Test CPU", "usable_cores": 2, "cpu_count": 2, "gpus": [], "torch": "2.14.1"}


def _result(name: str, devices: int, status: str = "ok", scale: float = 0.01) -> Result:
    extra: Dict[str, Any] = {
        "devices": [f"cpu:{k}" for k in range(devices)],
        "model_memory_per_device_gib": [scale] * devices,
        "predicted_per_device_gib": [2 * scale] * devices,
        "parameters": 1000,
        "model_memory_gib": scale * devices,
        "predicted_gib": 2 * scale * devices,
    }
    value: Optional[float] = None
    if status == "ok":
        extra["measured_per_device_gib"] = [1.9 * scale] * devices
        value = 1.9 * scale * devices
    return Result(
        table=TABLE.name,
        experiment=name,
        profile="quick",
        engine="gpipe-bench",
        kind="memory",
        metric=TABLE.metric,
        unit=TABLE.unit,
        value=value,
        status=status,
        environment=dict(ENV),
        extra=extra,
    )


def _rows(scale: float) -> List[Result]:
    return [
        _result("pipeline-8", 8, scale=scale),
        _result("naive-1", 1, "oom", scale),
        _result("pipeline-1", 1, scale=scale),
        _result("pipeline-2", 2, "predicted", scale),
        _result("pipeline-4", 4, scale=scale),
    ]


@pytest.mark.parametrize("scale", [0.01, 3.0])  # MiB and GiB axes
def test_writes_a_png(tmp_path: Path, scale: float) -> None:
    path = memory_plot(TABLE, _rows(scale), tmp_path / "deep" / "memory.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, like the JSON records beside it


def test_no_results_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no amoebanetd-memory results"):
        memory_plot(TABLE, [], tmp_path / "x.png")


@pytest.mark.parametrize("epochs", [3, 1])
def test_accuracy_plot(tmp_path: Path, epochs: int) -> None:
    """Curves per epoch beside each seed's final error; a one-epoch run (the quick profile) has only the latter."""
    from gpipe_bench.plot import accuracy_plot

    table = config.load("resnet101-accuracy")
    curves = {"0": [70.0, 50.0, 40.0][-epochs:], "1": [72.0, 52.0, 41.0][-epochs:]}
    results = [
        accuracy_record(name, [40.0, 41.0], mode, curves)
        for name, mode in (("pipeline-256", "pipeline"), ("dataparallel-256", "dataparallel"))
    ]
    path = accuracy_plot(table, results, tmp_path / "error.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="per-epoch curves"):
        accuracy_plot(table, [], tmp_path / "none.png")
