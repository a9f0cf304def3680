"""benchmarks/gpu_check.py and gpu_steps.py as far as a CPU can run them: the driver with fake steps, the timed steps on CPU.

The driver's job is to end in time and keep its results on a machine that is
taken back when its time is up, so most tests here are about its verdicts on
steps that hang, ignore SIGTERM or leave a process in a session of its own
behind, and about a driver stopped by SIGTERM. How such processes are found
and stopped is tested on its own in tests/test_processes.py. Fake steps are
small ``python -c`` scripts with caps of a few seconds; every test kills what
it started, also when it fails.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List

import pytest
import torch

from gpipe_bench.processes import KILL_WAIT_S
from helpers import kill_recorded, process_gone, rank_command, wait_for_file

ROOT = Path(__file__).resolve().parent.parent.parent


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
gpu_steps = _load("gpu_steps")


@pytest.fixture
def rank_pid_file(tmp_path: Path) -> Iterator[Path]:
    """Where the fake step writes its stray process's pid; that process is killed afterwards whatever happened."""
    path = tmp_path / "rank.pid"
    yield path
    kill_recorded(path)


def _fake_step(name: str, cap_s: float, pid_file: Path, mode: str, deaf: bool = False) -> Any:
    return gpu_check.Step(
        name, cap_s, lambda py, scratch: rank_command(pid_file, mode, deaf, python=py), gpu_check._tagged
    )


# -- without CUDA ---------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_gpu_check_without_cuda_is_one_line_and_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no CUDA device" in done.stderr


def test_a_step_in_a_child_finds_gpu_steps_beside_the_script() -> None:
    # As the driver starts it, but also with no PYTHONPATH and without the script's folder on
    # sys.path (PYTHONSAFEPATH): the probe answers 0 with CUDA, 4 without.
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--child", "probe"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONSAFEPATH": "1"},
    )
    assert done.returncode == (0 if torch.cuda.is_available() else 4), done.stderr
    assert done.stderr == ""


# Python statements that load the driver as module ``m`` in a fresh interpreter.
_LOAD_DRIVER = (
    "import importlib.util, sys;"
    f"spec = importlib.util.spec_from_file_location('g', {str(ROOT / 'benchmarks' / 'gpu_check.py')!r});"
    "m = importlib.util.module_from_spec(spec); sys.modules['g'] = m; spec.loader.exec_module(m);"
)


def test_the_driver_imports_neither_the_steps_nor_torch() -> None:
    script = "import sys;" + _LOAD_DRIVER + "print(sorted({'torch', 'gpu_steps'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


# -- one step: caps, budget, stray processes -----------------------------------------------------


@pytest.mark.timeout(30)
def test_a_step_past_its_cap_fails_and_its_stray_process_is_killed(tmp_path: Path, rank_pid_file: Path) -> None:
    # The step ignores SIGTERM (so only SIGKILL ends it) and its "rank" sits in a session of its
    # own holding the step's output: killing the step's process group alone would leave it.
    step = _fake_step("sleepy", 2, rank_pid_file, "hang", deaf=True)
    started = time.monotonic()
    outcome = gpu_check.run_step(step, sys.executable, tmp_path, tmp_path, 30, min_s=1, grace_s=1)
    elapsed = time.monotonic() - started
    assert elapsed < 2 + 1 + 2, f"took {elapsed:.1f} s for a 2 s cap and 1 s grace"
    assert outcome.status == "fail"
    assert outcome.figures == ["started", "timed out after 2 s (its cap)"]
    assert process_gone(int(rank_pid_file.read_text()))
    assert Path(outcome.log) == tmp_path / "sleepy.log" and "FIGURE: started" in Path(outcome.log).read_text()
    assert outcome.tail and outcome.tail[-1] == "FIGURE: started"


@pytest.mark.timeout(30)
def test_a_step_cut_by_the_budget_is_cut_not_failed(tmp_path: Path, rank_pid_file: Path) -> None:
    step = _fake_step("late", 30, rank_pid_file, "hang")
    outcome = gpu_check.run_step(step, sys.executable, tmp_path, tmp_path, 2, min_s=1, grace_s=1)
    assert outcome.status == "cut"
    assert outcome.figures[0] == "started"
    assert outcome.figures[1].startswith("cut (budget): stopped after 2 s")
    assert not any("timed out" in f for f in outcome.figures)
    assert process_gone(int(rank_pid_file.read_text()))


def test_gpu_check_runs_only_what_is_left_of_the_budget(tmp_path: Path) -> None:
    step = gpu_check.Step("late", 5, lambda py, scratch: [py, "-c", "pass"], gpu_check._tagged)
    skipped = gpu_check.run_step(step, sys.executable, tmp_path, tmp_path, 3)
    assert skipped.status == "skip" and skipped.figures == ["not run: the check's time budget is spent"]
    assert gpu_check.run_step(step, sys.executable, tmp_path, tmp_path, 30).status == "pass"


def test_a_failed_step_shows_its_failed_tests_and_the_end_of_its_log(tmp_path: Path) -> None:
    script = (
        "print('\\n'.join(f'line {i}' for i in range(30)));"
        "print('FAILED tests/pipe/test_cuda.py::test_copy[2] - AssertionError: 1 != 2');"
        "print('ERROR tests/pipe/test_cuda.py::test_streams - RuntimeError: CUDA error');"
        "print('== 1 failed, 1 error, 5 passed in 3.2s ==');"
        "raise SystemExit(1)"
    )
    step = gpu_check.Step("tests", 10, lambda py, scratch: [py, "-c", script], gpu_check._pytest_summary)
    outcome = gpu_check.run_step(step, sys.executable, tmp_path, tmp_path, 30, min_s=1)
    assert outcome.status == "fail"
    assert outcome.figures == ["1 failed, 1 error, 5 passed in 3.2s", "exit code 1"]
    assert outcome.failures == [
        "FAILED tests/pipe/test_cuda.py::test_copy[2] - AssertionError: 1 != 2",
        "ERROR tests/pipe/test_cuda.py::test_streams - RuntimeError: CUDA error",
    ]
    assert len(outcome.tail) == 15 and outcome.tail[0] == "line 18"
    text = gpu_check.summary([], [outcome])
    assert "      FAILED tests/pipe/test_cuda.py::test_copy[2] - AssertionError: 1 != 2" in text
    assert f"      last lines of {tmp_path / 'tests.log'}:" in text
    assert "      | == 1 failed, 1 error, 5 passed in 3.2s ==" in text


# -- the driver: budget from the process's start, SIGTERM --------------------------------------------


def _driver(tmp_path: Path, steps: List[Dict[str, object]], *args: str) -> subprocess.Popen[str]:
    spec = tmp_path / "steps.json"
    spec.write_text(json.dumps(steps))
    return subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--steps-json", str(spec), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


def _fake(name: str, cap_s: float, pid_file: Path, mode: str) -> Dict[str, object]:
    return {"name": name, "cap_s": cap_s, "argv": rank_command(pid_file, mode, python="{python}")}


QUICK = {"name": "quick", "cap_s": 10, "argv": ["{python}", "-c", "print('FIGURE: quick done')"]}


@pytest.mark.timeout(60)
def test_sigterm_mid_step_stops_the_step_and_prints_the_summary_so_far(tmp_path: Path, rank_pid_file: Path) -> None:
    out = tmp_path / "out"
    driver = _driver(
        tmp_path,
        [QUICK, _fake("hang", 30, rank_pid_file, "hang"), {**QUICK, "name": "after"}],
        "--out",
        str(out),
        "--grace",
        "1",
        "--min-step",
        "1",
    )
    try:
        wait_for_file(rank_pid_file)
        time.sleep(0.2)
        driver.send_signal(signal.SIGTERM)
        stdout, stderr = driver.communicate(timeout=20)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 128 + signal.SIGTERM, stderr
    assert process_gone(int(rank_pid_file.read_text()))
    text = stdout[stdout.index("\ngpu-check\n") + 1 :].rstrip("\n")
    lines = text.splitlines()
    assert any(line.startswith("PASS  quick") for line in lines)
    assert any(line.startswith("CUT   hang") for line in lines)
    assert any(line.startswith("      cut (SIGTERM): stopped after") for line in lines)
    assert any(line.startswith("SKIP  after") for line in lines)
    assert "      not run: the check was stopped (SIGTERM)" in lines
    assert lines[-1] == "gpu-check: 1 passed, 0 failed, 1 cut, 1 skipped"
    assert (out / "summary.txt").read_text().rstrip("\n") == text
    saved = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in saved["steps"]] == ["pass", "cut", "skip"] and saved["pending"] == []
    assert "FIGURE: started" in (out / "hang.log").read_text()


@pytest.mark.timeout(60)
def test_the_budget_ends_the_check_in_time_cutting_and_skipping_steps(tmp_path: Path, rank_pid_file: Path) -> None:
    started = time.monotonic()
    driver = _driver(
        tmp_path,
        [_fake("hang", 30, rank_pid_file, "hang"), QUICK],
        "--out",
        str(tmp_path / "out"),
        "--budget",
        "3",
        "--grace",
        "1",
        "--min-step",
        "1",
    )
    try:
        stdout, stderr = driver.communicate(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    elapsed = time.monotonic() - started
    assert elapsed < 3 + 3.5, f"a 3 s budget took {elapsed:.1f} s"
    assert driver.returncode == 1, stderr
    assert process_gone(int(rank_pid_file.read_text()))
    assert re.search(r"^CUT   hang .*\n      started\n      cut \(budget\): stopped after", stdout, re.M)
    assert re.search(r"^SKIP  quick .*\n      not run: the check's time budget is spent$", stdout, re.M)
    assert stdout.rstrip("\n").endswith("gpu-check: 0 passed, 0 failed, 1 cut, 1 skipped")


@pytest.mark.timeout(60)
def test_a_process_a_step_leaves_running_is_killed(tmp_path: Path, rank_pid_file: Path) -> None:
    # Through the driver: once the step has exited, its stray process (own session, re-parented)
    # is found only because the driver is a subreaper and so adopted it.
    driver = _driver(tmp_path, [_fake("leaky", 10, rank_pid_file, "exit")], "--out", str(tmp_path / "out"))
    try:
        stdout, stderr = driver.communicate(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    pid = int(rank_pid_file.read_text())
    assert driver.returncode == 0, stdout + stderr
    assert "\nPASS  leaky" in stdout
    assert f"      killed 1 process(es) the step left running: pid {pid}\n" in stdout
    assert process_gone(pid)


def test_the_budget_counts_from_the_start_of_the_process() -> None:
    # Time spent before the module is loaded (interpreter start-up, imports) is part of the budget.
    script = "import time; time.sleep(1.5);" + _LOAD_DRIVER + "print(time.monotonic() - m.STARTED)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert 1.5 <= float(done.stdout) < 10


def test_the_makefile_timeout_leaves_room_for_the_budget_and_the_last_stop() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\ngpu-check:\n", 1)[1].splitlines()[0]
    match = re.search(r"\btimeout -k (\d+) (\d+) ", recipe)
    assert match, recipe
    kill_after, limit = int(match.group(1)), int(match.group(2))
    assert limit + kill_after <= 480  # 8 minutes
    assert gpu_check.BUDGET_S + gpu_check.GRACE_S + KILL_WAIT_S + 5 <= limit


# -- the pieces ---------------------------------------------------------------------------------------


def test_gpu_check_summary_lists_every_step_and_counts() -> None:
    outcomes = [
        gpu_check.Outcome("tests", "pass", 12.0, ["20 passed in 11.9s"]),
        gpu_check.Outcome("syncs", "fail", 3.0, ["host syncs per training step: 2 at 4 micro-batches, 8 at 16"]),
        gpu_check.Outcome("speed", "cut", 40.0, ["cut (budget): stopped after 40 s"], tail=["step 3"], log="/o/s.log"),
        gpu_check.Outcome("engine", "skip", 0.0, ["not run: the check's time budget is spent"]),
    ]
    text = gpu_check.summary(["card:   X"], outcomes)
    lines = text.splitlines()
    assert lines[0] == "gpu-check" and lines[1] == "card:   X"
    assert any(line.startswith("PASS  tests") for line in lines)
    assert any(line.startswith("FAIL  syncs") for line in lines)
    assert any(line.startswith("CUT   speed") for line in lines)
    assert "      host syncs per training step: 2 at 4 micro-batches, 8 at 16" in lines
    at = lines.index("      cut (budget): stopped after 40 s")
    assert lines[at + 1 : at + 4] == ["      last lines of /o/s.log:", "      | step 3", "SKIP  engine          0.0 s"]
    assert lines[-1] == "gpu-check: 1 passed, 1 failed, 1 cut, 1 skipped"
    assert gpu_check.summary([], outcomes[:2]).splitlines()[-1] == "gpu-check: 1 passed, 1 failed"


def test_the_output_folder_is_out_then_gpu_check_out_then_OUT_then_a_new_one(tmp_path: Path) -> None:
    env = {"GPU_CHECK_OUT": "/a", "OUT": "/b"}
    assert gpu_check.choose_out("/c", env) == Path("/c")
    assert gpu_check.choose_out("", env) == Path("/a")
    assert gpu_check.choose_out("", {"OUT": "/b"}) == Path("/b")
    fresh = gpu_check.choose_out("", {})
    try:
        assert fresh.is_dir() and fresh.name.startswith("gpu-check-") and not list(fresh.iterdir())
    finally:
        fresh.rmdir()


def test_the_tests_step_names_failures_and_dumps_stacks_on_timeout(tmp_path: Path) -> None:
    argv = next(s for s in gpu_check.STEPS if s.name == "tests").command("python", tmp_path)
    assert "-rfEs" in argv and "--timeout-method=thread" in argv and "-v" in argv


def test_a_test_stopped_by_pytest_timeout_is_named(tmp_path: Path) -> None:
    (tmp_path / "test_stuck.py").write_text("import time\ndef test_ok(): pass\ndef test_stuck(): time.sleep(30)\n")
    argv = next(s for s in gpu_check.STEPS if s.name == "tests").command(sys.executable, tmp_path)
    at = argv.index("cuda")  # the step's own command, less "-m cuda" and the repository's test files
    argv = [a for a in argv[: at - 1] + argv[at + 1 :] if not a.endswith(".py")] + ["--timeout", "1", "test_stuck.py"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert gpu_check.failed_tests(done.stdout + done.stderr) == [
        "TIMEOUT test_stuck.py::test_stuck (pytest-timeout; every thread's stack is in the log)"
    ]


def test_engine_figures_are_its_ratio_rows() -> None:
    out = "\n".join(
        [
            "row    engine       devices",
            "(a)    nn.Sequential, grad accumulation  cuda  0.0351",
            "(b)    our GPipe                         cuda, cuda  0.1224",
            "ratio                                           measured",
            "(b)/(a) throughput: our GPipe vs plain          0.987       >= 0.95   -   -   PASS",
            "(h) host-bound: our GPipe vs plain              0.91        >= 0.90   -   -   PASS",
        ]
        + [f"(x{i})/(y) more {i}" for i in range(14)]
    )
    rows = gpu_check._ratios(out)
    assert rows[:2] == [
        "(b)/(a) throughput: our GPipe vs plain          0.987       >= 0.95   -   -   PASS",
        "(h) host-bound: our GPipe vs plain              0.91        >= 0.90   -   -   PASS",
    ]
    assert len(rows) == 12


def test_gpu_busy_time_is_the_union_of_the_kernels_intervals() -> None:
    assert gpu_steps.busy_seconds([(0, 10), (5, 15), (20, 30), (21, 22)]) == pytest.approx(25e-6)
    assert gpu_steps.busy_seconds([]) == 0.0


def test_mixed_timed_checks_and_times_on_virtual_cpu_devices() -> None:
    ok, figures = gpu_steps.mixed_timed(["cpu:0", "cpu:1", "cpu:0"], chunks=4, micro=4, repeats=2)
    assert ok, figures
    assert "largest difference to the plain model" in figures[0]
    assert re.search(r"4 micro-batches of 4, float64: training step median [\d.]+ ms", figures[1])


def test_profile_figures_on_the_cpu() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    figures = gpu_steps.profile_figures(model, [2, 1], ["cpu", "cpu"], 2, 4, (8,), 4, "tiny", repeats=1)
    assert figures[0].startswith("tiny: step ") and "GPU busy 0.0% of it" in figures[0]
    assert re.match(r"host time per micro-batch: engine [\d.]+ ms .*, plain model [\d.]+ ms", figures[1])
    assert [f.split(" cell:")[0] for f in figures[2:]] == [
        "engine host time per forward",
        "engine host time per recompute",
        "engine host time per backward",
    ]


def test_gpu_check_finds_the_cuda_tests() -> None:
    files = gpu_check._cuda_test_files()
    assert "tests/pipe/test_cuda.py" in files
