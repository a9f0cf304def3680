"""The command line as a user runs it: help, listing, and every kind of bad input.

Bad input ends as one line naming the bad value and the fix, exit code 2, no
traceback, and no results file. A tiny end-to-end run checks the happy path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List

import pytest
from click.testing import CliRunner, Result

from gpipe_bench.cli import main
from helpers import one_line_error, tiny_configs


def _run(args: List[str], **env: str) -> Result:
    return CliRunner().invoke(main, args, env=env or None)


def test_help_reads_like_a_man_page() -> None:
    out = _run(["--help"]).output
    assert "gpipe-bench speed resnet101 --pipeline 8" in out
    for command in ("speed", "table", "compare", "list"):
        assert command in out
    speed_help = _run(["speed", "--help"]).output
    assert "Example:" in speed_help and "--devices" in speed_help and "--balance" in speed_help


def test_every_command_names_the_results_directory_results_and_keeps_output_working(tmp_path: Path) -> None:
    for command in ("speed", "memory", "accuracy", "predict", "table", "compare"):
        shown = _run([command, "--help"]).output
        assert "--results DIR" in shown and "--output" not in shown, command  # the old name works, unadvertised
    table = _run(["table", "resnet101-speed", "--output", str(tmp_path)])  # an old command line
    assert table.exit_code == 0 and "No results for resnet101-speed yet" in table.output


def test_help_prints_percent_signs_as_written() -> None:
    assert "80% of the available host memory" in " ".join(_run(["plan", "--help"]).output.split())


def test_list() -> None:
    result = _run(["list"])
    assert result.exit_code == 0
    assert "resnet101-speed" in result.output and "370 layers, 42,520,650 parameters" in result.output
    assert "pipeline-2-planned" in result.output


def test_list_says_what_each_model_is_for() -> None:
    lines = _run(["list"]).output.splitlines()
    uses = {line.split(":")[0].strip(): after.strip() for line, after in zip(lines, lines[1:]) if "parameters;" in line}
    assert uses["resnet101"] == "for speed, accuracy, predict, plan"
    assert uses["amoebanetd"] == "for speed, memory, predict, plan"
    assert uses["amoebanetd-corrected"] == "for predict (its plain model, naive-1)"
    assert uses["resnet14"] == (
        "for predict (its plain model, naive-1); the model the resnet101-accuracy quick profile trains"
    )


@pytest.mark.parametrize(
    "args, needles",
    [
        (["speed", "vgg16"], ["vgg16", "resnet101"]),
        (["speed", "resnet101", "--pipeline", "3"], ["pipeline"]),
        (["speed", "resnet101", "--experiment", "pipeline-16"], ["pipeline-16"]),
        (["speed", "resnet101", "--pipeline", "2", "--balance", "1,2"], ["balance", "370"]),
        (["speed", "resnet101", "--pipeline", "2", "--balance", "a,b"], ["--balance", "a,b"]),
        (["speed", "resnet101", "--pipeline", "2", "--batch-size", "x"], ["--batch-size", "x"]),
        (["speed", "resnet101", "--pipeline", "2", "--chunks", "-1"], ["--chunks", "-1"]),
        (["speed", "resnet101", "--pipeline", "2", "--batch-size", "8", "--chunks", "16"], ["chunks", "16"]),
        (["speed", "resnet101", "--pipeline", "2", "--devices", "cpu:0"], ["--devices", "2 partitions"]),
        (["speed", "resnet101", "--pipeline", "2", "--devices", "gpu:0,gpu:1"], ["--devices", "gpu:0"]),
        (["speed", "resnet101", "--pipeline", "2", "--naive", "1"], ["--pipeline", "--naive"]),
        (["speed", "resnet101", "--pipeline", "2", "--precision", "fp16"], ["--precision", "a CPU", "fp32, bf16"]),
        (["speed", "resnet101", "--pipeline", "2", "--precision", "tf32"], ["--precision", "a CPU", "fp32, bf16"]),
        (["speed", "resnet101", "--pipeline", "2", "--precision", "fp8"], ["--precision", "fp8"]),
        (["memory", "amoebanetd", "--pipeline", "2", "--precision", "fp16"], ["--precision", "a CPU", "fp32, bf16"]),
        (["accuracy", "resnet101", "--precision", "tf32"], ["--precision", "a CPU", "fp32, bf16"]),
        (["table", "resnet101-sped"], ["resnet101-sped"]),
        (["compare", "nope"], ["nope"]),
    ],
)
def test_bad_input(args: List[str], needles: List[str], tmp_path: Path) -> None:
    output = ["--output", str(tmp_path / "out")] if args[0] in ("speed", "memory", "accuracy") else []
    result = _run([*args, *output])
    one_line_error(result, *needles)
    assert "No CUDA device" not in result.output  # the profile's note is said once the rows resolve, not before
    assert not list(tmp_path.rglob("*.json"))


QUICK_PIPELINE_2 = ["resnet101", "--pipeline", "2", "--profile", "quick"]


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["speed", *QUICK_PIPELINE_2, "--skip-epochs", "5"],
            "--skip-epochs 5: not less than epochs (3): nothing would be measured; use --skip-epochs 2 or less, "
            "or --epochs 6 or more",
        ),
        (
            ["speed", *QUICK_PIPELINE_2, "--epochs", "1"],
            "--epochs 1: not more than the warm-up epochs left out (skip_epochs 1): nothing would be measured; "
            "use --skip-epochs 0, or --epochs 2 or more",
        ),
        (
            ["speed", *QUICK_PIPELINE_2, "--batch-size", "8", "--chunks", "16"],
            "--chunks 16: more micro-batches than samples in the batch (8); use --chunks 8 or less",
        ),
        (
            ["predict", *QUICK_PIPELINE_2, "--batch-size", "2"],
            "--batch-size 2: fewer samples than the row's 4 micro-batches (chunks); use --batch-size 4 or more, "
            "or --chunks 2 or less",
        ),
        (
            ["memory", "amoebanetd", "--naive", "1", "--profile", "quick", "--chunks", "4"],
            "--chunks 4: naive rows have no micro-batches; leave --chunks out (micro-batching is what pipeline rows do)",
        ),
    ],
)
def test_a_bad_flag_value_is_named_by_its_flag(args: List[str], line: str, tmp_path: Path) -> None:
    """The user typed a flag, so the error names the flag and its fix, not the config file and key it overrides."""
    output = ["--output", str(tmp_path / "out")] if args[0] in ("speed", "memory") else []
    result = _run([*args, *output])
    one_line_error(result, line)
    assert ".yaml" not in result.output and "settings." not in result.output and "rows." not in result.output
    assert not list(tmp_path.rglob("*.json"))


def test_malformed_yaml(tmp_path: Path) -> None:
    (tmp_path / "resnet101-speed.yaml").write_text("name: resnet101-speed\nrows: [\n")
    result = _run(["table", "resnet101-speed"], GPIPE_BENCH_CONFIGS=str(tmp_path))
    one_line_error(result, "resnet101-speed.yaml")


def test_unwritable_output_fails_before_measuring(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _run(
        [
            "speed",
            "resnet101",
            "--pipeline",
            "2",
            "--profile",
            "quick",
            "--devices",
            "cpu:0,cpu:1",
            "--output",
            str(blocker / "results"),
        ]
    )
    one_line_error(result, "cannot write")


def test_a_row_end_to_end(tmp_path: Path) -> None:
    """One tiny row: measured, saved whole, and printed beside the published table."""
    configs = tiny_configs(tmp_path / "cfg")
    result = _run(
        [
            "speed",
            "resnet101",
            "--experiment",
            "pipeline-2",
            "--profile",
            "quick",
            "--devices",
            "cpu:0,cpu:1",
            "--epochs",
            "2",
            "--skip-epochs",
            "1",
            "--batch-size",
            "8",
            "--chunks",
            "2",
            "--quiet",
            "--output",
            str(tmp_path),
        ],
        GPIPE_BENCH_CONFIGS=configs,
    )
    assert result.exit_code == 0, result.output
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1 and files[0].name == "pipeline-2.json"
    assert "137.788" in result.output  # the published figure beside ours
    table = _run(["table", "resnet101-speed", "--results", str(tmp_path), "--format", "md"])
    assert table.exit_code == 0 and "pipeline-2" in table.output


def test_progress_in_a_log_is_whole_lines_not_a_bare_row_name(tmp_path: Path) -> None:
    """CliRunner's stderr is no terminal, as a CI log or `2> file` is: each epoch is one readable line."""
    configs = tiny_configs(tmp_path / "cfg")
    args = ["speed", "resnet101", "--experiment", "naive-1", "--profile", "quick", "--devices", "cpu"]
    result = _run([*args, "--epochs", "2", "--output", str(tmp_path)], GPIPE_BENCH_CONFIGS=configs)
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.stderr.splitlines() if "naive-1" in line]
    assert "naive-1" not in lines  # the bar's label alone, as click prints it without a terminal
    epochs = [line for line in lines if line.startswith("naive-1: epoch")]
    assert [line.split(" samples/s")[0].rsplit(" ", 1)[0] for line in epochs] == [
        "naive-1: epoch 1/2",
        "naive-1: epoch 2/2",
    ]
    assert all(line.endswith("samples/s") for line in epochs)


def test_a_row_in_bf16_is_saved_beside_the_fp32_record_and_apart_in_the_table(tmp_path: Path) -> None:
    configs = tiny_configs(tmp_path / "cfg")
    args = ["speed", "resnet101", "--experiment", "pipeline-2", "--profile", "quick", "--devices", "cpu:0,cpu:1"]
    args += ["--epochs", "2", "--skip-epochs", "1", "--batch-size", "8", "--chunks", "2", "--quiet"]
    for extra in ([], ["--precision", "bf16"]):
        result = _run([*args, *extra, "--output", str(tmp_path / "out")], GPIPE_BENCH_CONFIGS=configs)
        assert result.exit_code == 0, result.output
    files = sorted(f.name for f in (tmp_path / "out").rglob("*.json"))
    assert files == ["pipeline-2--bf16.json", "pipeline-2.json"]
    record = json.loads(next((tmp_path / "out").rglob("pipeline-2--bf16.json")).read_text())
    assert record["settings"]["precision"] == "bf16"
    table = _run(["table", "resnet101-speed", "--results", str(tmp_path / "out")], GPIPE_BENCH_CONFIGS=configs)
    assert "(quick profile):" in table.output and "(quick profile, bf16):" in table.output


def test_torchgpipe_engine_on_the_same_settings(tmp_path: Path) -> None:
    pytest.importorskip("torchgpipe")
    configs = tiny_configs(tmp_path / "cfg")
    result = _run(
        [
            "speed",
            "resnet101",
            "--experiment",
            "pipeline-2",
            "--profile",
            "quick",
            "--devices",
            "cpu:0,cpu:1",
            "--epochs",
            "2",
            "--skip-epochs",
            "1",
            "--batch-size",
            "8",
            "--chunks",
            "2",
            "--quiet",
            "--engine",
            "torchgpipe",
            "--output",
            str(tmp_path),
        ],
        GPIPE_BENCH_CONFIGS=configs,
    )
    assert result.exit_code == 0, result.output
    assert [f.name for f in tmp_path.rglob("*.json")] == ["pipeline-2--torchgpipe.json"]


def test_a_results_file_that_is_not_a_record_is_one_warning_line(tmp_path: Path) -> None:
    (tmp_path / "resnet101-speed").mkdir()
    (tmp_path / "resnet101-speed" / "junk.json").write_text("{not json")
    result = _run(["table", "resnet101-speed", "--results", str(tmp_path)])
    assert result.exit_code == 0
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 1 and "junk.json" in warnings[0]


def test_a_precision_gets_its_own_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpipe_bench import cli, config, plot
    from gpipe_bench.results import Result

    drawn: List[Any] = []

    def memory_plot(table: Any, results: List[Result], path: Path) -> Path:
        drawn.append(([r.precision for r in results], path.name))
        return path

    monkeypatch.setattr(plot, "memory_plot", memory_plot)
    table = config.load("amoebanetd-memory")

    def record(precision: str) -> Result:
        settings = {"precision": precision}
        return Result(
            "amoebanetd-memory",
            "pipeline-2",
            "quick",
            "gpipe-bench",
            "memory",
            "m",
            "GiB",
            1.0,
            "ok",
            settings=settings,
            environment={"cpu_model": "x"},
        )

    fp32, bf16 = record("fp32"), record("bf16")
    cli._write_plot("memory", table, [fp32, bf16], tmp_path, [bf16])
    cli._write_plot("memory", table, [fp32, bf16], tmp_path, [fp32])
    assert drawn == [(["bf16"], "memory-per-device--bf16.png"), (["fp32"], "memory-per-device.png")]
