"""`gpipe-bench predict` as a user runs it: presets, formats, calibration, timelines, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest
from click.testing import CliRunner, Result

from gpipe_bench.cli import main
from helpers import one_line_error


def _run(args: List[str]) -> Result:
    return CliRunner().invoke(main, args)


def test_hardware_list_shows_every_preset_with_its_sources() -> None:
    result = _run(["predict", "resnet101", "--hardware", "list"])
    assert result.exit_code == 0, result.output
    for name in ("p40", "v100", "a100", "h100", "h200", "epyc-2vcpu"):
        assert f"\n{name}" in result.output
    assert "https://" in result.output


def test_a_published_row_on_a_preset_as_json(tmp_path: Path) -> None:
    result = _run(
        [
            "predict",
            "resnet101",
            "--pipeline",
            "2",
            "--hardware",
            "p40",
            "--calibrate",
            "naive-1=92.539",
            "--format",
            "json",
            "--results",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["experiment"] for r in rows] == ["pipeline-2"]
    row = rows[0]
    assert row["throughput"] > 0 and row["speedup"] > 1.0
    assert row["published_speedup"] == 1.489
    assert 0.0 <= row["bubble"] < 1.0
    assert len(row["peak_activation_bytes_per_device"]) == 2
    # GPU rows: what the caching allocator would reserve, never below what it allocates
    reserved, allocated = row["predicted_reserved_bytes_per_device"], row["predicted_allocated_bytes_per_device"]
    assert len(reserved) == 2 and all(r >= a > 0 for r, a in zip(reserved, allocated))
    assert row["predicted_reserved_gib"] == sum(reserved) / 2**30
    assert "efficiency" in row["costs"] and "naive-1=92.539" in row["costs"]


def test_calibration_hits_its_figure(tmp_path: Path) -> None:
    result = _run(
        [
            "predict",
            "resnet101",
            "--naive",
            "1",
            "--hardware",
            "v100",
            "--calibrate",
            "naive-1=100",
            "--format",
            "json",
            "--results",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["throughput"] == pytest.approx(100, rel=1e-3)


def test_simulated_timeline_files(tmp_path: Path) -> None:
    target = tmp_path / "sim"
    result = _run(
        [
            "predict",
            "amoebanetd",
            "--pipeline",
            "2",
            "--hardware",
            "a100",
            "--timeline",
            str(target),
            "--results",
            str(tmp_path),
        ]
    )
    assert result.exit_code == 0, result.output
    trace = json.loads((tmp_path / "sim.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"F0", "B0"} <= names
    assert (tmp_path / "sim.png").stat().st_size > 0
    assert "simulated timeline" in result.output


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--hardware", "tpu"], ["tpu", "p40", "h200"]),
        (["--hardware", "p40", "--calibrate", "pipeline-16=3"], ["pipeline-16", "naive-1"]),
        (["--hardware", "p40", "--calibrate", "naive-1"], ["--calibrate", "ROW=THROUGHPUT"]),
        (["--hardware", "p40", "--calibrate", "naive-1=-4"], ["--calibrate"]),
        (["--hardware", "p40", "--costs", "measured"], ["--costs", "give one"]),
        (["--calibrate", "naive-1=92.5"], ["--calibrate", "--hardware"]),
        (["--hardware", "p40", "--pipeline", "2", "--balance", "1,2"], ["balance", "370"]),
        (["--host-speed", "2"], ["--host-speed", "--hardware"]),
        (["--hardware", "p40", "--host-speed", "0"], ["--host-speed"]),
        (
            [
                "--hardware",
                "p40",
                "--pipeline",
                "2",
                "--engine",
                "distributed",
                "--schedule",
                "interleaved",
                "--nproc",
                "2",
            ],
            ["interleaved"],
        ),
    ],
)
def test_bad_input_is_one_line(args: List[str], needles: List[str], tmp_path: Path) -> None:
    result = _run(["predict", "resnet101", *args, "--results", str(tmp_path)])
    one_line_error(result, *needles)


def test_unwritable_timeline_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _run(["predict", "resnet101", "--pipeline", "2", "--hardware", "p40", "--timeline", str(blocker / "t")])
    one_line_error(result, "timeline", str(blocker))


def _own_p40(tmp_path: Path, change: str = "", to: str = "") -> Path:
    """The packaged p40 preset as a file of one's own (its fields at the top level), ``change`` replaced by ``to``."""
    from gpipe_bench.predict.hardware import PRESETS_FILE

    text = PRESETS_FILE.read_text(encoding="utf-8").split("\n  p40:\n")[1].split("\n\n")[0]
    path = tmp_path / "my-p40.yaml"
    path.write_text("\n".join(line[4:] for line in text.splitlines()).replace(change, to) + "\n", encoding="utf-8")
    return path


def test_hardware_file_predicts_as_the_preset_it_copies(tmp_path: Path) -> None:
    args = ["predict", "resnet101", "--pipeline", "2", "--format", "json", "--results", str(tmp_path)]
    packaged = _run([*args, "--hardware", "p40"])
    own = _run([*args, "--hardware-file", str(_own_p40(tmp_path))])
    assert packaged.exit_code == own.exit_code == 0, own.output
    figure = [json.loads(r.stdout)[0]["throughput"] for r in (packaged, own)]
    assert figure[0] == pytest.approx(figure[1], rel=0.02)  # the same preset; host timing differs a little


@pytest.mark.parametrize(
    "command, change, to, needles",
    [
        (
            ["predict", "resnet101"],
            "fp32_flops:",
            "fp32_flop:",
            ["--hardware-file", "unknown field 'fp32_flop'", "fp32_flops"],
        ),
        (
            ["plan", "resnet101", "--devices", "0,1"],
            "memory: 25769803776",
            "memory: lots",
            ["--hardware-file", "my-p40.memory", "'lots'"],
        ),
        (["plan", "resnet101", "--devices", "0,1", "--hardware", "p40"], "", "", ["--hardware-file", "give one"]),
        (["predict", "resnet101", "--costs", "measured"], "", "", ["--hardware-file and --costs measured"]),
    ],
)
def test_a_bad_hardware_file_is_one_line(
    tmp_path: Path, command: List[str], change: str, to: str, needles: List[str]
) -> None:
    path = _own_p40(tmp_path, change, to)
    one_line_error(_run([*command, "--hardware-file", str(path)]), *needles)


def test_a_missing_hardware_file_is_one_line(tmp_path: Path) -> None:
    one_line_error(
        _run(["predict", "resnet101", "--hardware-file", str(tmp_path / "nope.yaml")]),
        "--hardware-file",
        "nope.yaml: No such file or directory",
        "give the path of a YAML file",
    )
