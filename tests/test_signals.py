"""Signals sent as a scheduler or a script sends them: to the main process only, default dispositions.

Each run is started in a session of its own (as a job scheduler starts a
job), signalled by pid, and checked for its exit code, the records it left,
and that no process it started outlives it (named by pid and start time, as
pids are reused). signals.py's own rules are tested in-process below.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
import yaml

from gpipe_bench import processes, signals
from gpipe_bench.data import fashion_mnist
from helpers import tiny_configs

ROOT = Path(__file__).resolve().parents[1]


# -- the policy in this process ------------------------------------------------------------------------------------


def test_the_exit_code_is_128_plus_the_signal_ctrl_c_by_default() -> None:
    assert signals.exit_code(signals.Stopped(signal.SIGTERM)) == 143
    assert signals.exit_code(signals.Stopped(signal.SIGINT)) == 130
    assert signals.exit_code(KeyboardInterrupt()) == 130


def test_the_first_sigterm_is_a_keyboard_interrupt_naming_it_and_the_old_handlers_come_back() -> None:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    restore = signals.install()
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes
        assert isinstance(stopped.value, signals.Stopped) and stopped.value.signum == signal.SIGTERM
    finally:
        restore()
    assert {s: signal.getsignal(s) for s in saved} == saved


def test_a_command_run_in_process_gives_the_callers_handlers_back() -> None:
    from click.testing import CliRunner

    from gpipe_bench.cli import main

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert CliRunner().invoke(main, ["list"]).exit_code == 0
    assert {s: signal.getsignal(s) for s in saved} == saved


_SLOW_TO_STOP = """
import sys, time
from pathlib import Path
from gpipe_bench import signals
signals.install()
with signals.on_stop(lambda: Path(sys.argv[1]).write_text("told")):
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        time.sleep(60)  # a slow clean-up
"""


def test_a_second_signal_ends_the_run_at_once_after_telling_the_children(tmp_path: Path) -> None:
    told = tmp_path / "told"
    main = subprocess.Popen(
        [sys.executable, "-c", _SLOW_TO_STOP, str(told)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    _STARTED.append(main)
    assert main.stdout is not None and main.stdout.readline().strip() == b"ready"
    main.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert main.poll() is None and not told.exists()  # the first: cleaning up
    main.send_signal(signal.SIGINT)
    assert main.wait(timeout=10) == 130
    assert told.read_text() == "told"
    assert b"Stopped by a second SIGINT" in main.communicate()[1]


# -- runs, as a scheduler sees them --------------------------------------------------------------------------------


_STARTED: List[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _nothing_left_running() -> Iterator[None]:
    """A test that fails half-way must not leave its run computing: every run it started is killed after it."""
    yield
    while _STARTED:
        main = _STARTED.pop()
        if main.poll() is None:
            for proc in processes.step_processes(main.pid, subreaper=False).values():
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            main.wait(timeout=10)


def _start(args: List[str], tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    log = open(tmp_path / "log.txt", "wb")  # a file, not a pipe: nothing blocks on a full pipe
    main = subprocess.Popen(
        [sys.executable, "-m", "gpipe_bench.cli", *args],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **env},
    )
    _STARTED.append(main)
    return main


def _tree(main: subprocess.Popen[bytes]) -> Dict[int, processes.Proc]:
    return {pid: p for pid, p in processes.step_processes(main.pid, subreaper=False).items() if pid != main.pid}


def _wait_for(what: Callable[[], bool], timeout_s: float, label: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {label}")
        time.sleep(0.2)


def _signal_and_wait(
    main: subprocess.Popen[bytes], signum: int, timeout_s: float = 30.0
) -> Tuple[int, float, Dict[int, processes.Proc]]:
    """(exit code, seconds to stop, the processes the run had started when signalled)."""
    started = _tree(main)
    sent = time.monotonic()
    os.kill(main.pid, signum)
    code = main.wait(timeout=timeout_s)
    return code, time.monotonic() - sent, started


def _gone(procs: Dict[int, processes.Proc], within_s: float) -> None:
    def none_alive() -> bool:
        return not [p for p in procs.values() if _alive(p)]

    _wait_for(none_alive, within_s, f"the run's processes {sorted(procs)} to end")


def _alive(p: processes.Proc) -> bool:
    try:
        text = Path(f"/proc/{p.pid}/stat").read_text()
    except OSError:
        return False
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[19]) == p.start and rest[0] != "Z"


def _records(root: Path) -> List[Path]:
    return sorted(root.rglob("*.json"))


def _output(tmp_path: Path) -> str:
    return (tmp_path / "log.txt").read_text(errors="replace")


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist.DEFAULT_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make data)"
)


def _replicas_running(main: subprocess.Popen[bytes]) -> bool:
    return len(_tree(main)) >= 3  # two replicas and multiprocessing's resource tracker


def _accuracy(tmp_path: Path) -> subprocess.Popen[bytes]:
    out = tmp_path / "out"
    main = _start(
        ["accuracy", "resnet101", "--experiment", "dataparallel-256", "--seeds", "1", "--quiet", "--output", str(out)],
        tmp_path,
    )
    _wait_for(lambda: _replicas_running(main) or main.poll() is not None, 60, "the replicas")
    time.sleep(3)  # training, not starting up
    assert main.poll() is None, _output(tmp_path)
    return main


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_data_parallel_row_stops_at_once_and_takes_its_replicas(tmp_path: Path, signum: int, code: int) -> None:
    main = _accuracy(tmp_path)
    exit_code, seconds, started = _signal_and_wait(main, signum)
    assert exit_code == code, _output(tmp_path)
    assert seconds < 10, seconds
    lines = [line for line in _output(tmp_path).splitlines() if line.startswith("Interrupted")]
    assert len(lines) == 1 and "dataparallel-256" in lines[0], _output(tmp_path)
    assert "Traceback" not in _output(tmp_path)
    assert _records(tmp_path / "out") == []  # no seed finished: nothing written
    _gone(started, 5)


@pytest.mark.slow
@needs_fashion_mnist
def test_a_killed_run_leaves_no_replica_behind(tmp_path: Path) -> None:
    main = _accuracy(tmp_path)
    exit_code, _, started = _signal_and_wait(main, signal.SIGKILL)
    assert exit_code == -signal.SIGKILL
    _gone(started, 5)


def _tiny_speed_table(directory: Path) -> str:
    """tiny_configs with micro-batches of at least 4 (BatchNorm needs more than one sample per channel)."""
    configs = tiny_configs(directory)
    path = Path(configs) / "resnet101-speed.yaml"
    data = yaml.safe_load(path.read_text())
    planned = {r["name"] for r in data["rows"] if r.get("balance") == "planned"}  # planning would time the layers first
    data["rows"] = [r for r in data["rows"] if r["name"] not in planned]
    for name in planned:
        data["profiles"]["quick"]["rows"].pop(name, None)
    for row in data["rows"]:
        if row["mode"] == "pipeline":
            data["profiles"]["quick"]["rows"][row["name"]]["chunks"] = 2
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return configs


def _speed(tmp_path: Path, epochs: int) -> subprocess.Popen[bytes]:
    configs = _tiny_speed_table(tmp_path / "cfg")
    args = ["speed", "resnet101", "--profile", "quick"]
    args += ["--epochs", str(epochs), "--skip-epochs", "1", "--quiet", "--output", str(tmp_path / "out")]
    return _start(args, tmp_path, GPIPE_BENCH_CONFIGS=configs)


def _stopped_speed_run(tmp_path: Path, main: subprocess.Popen[bytes]) -> List[Path]:
    """SIGTERM: exit 143 within seconds, one line, no process left; the records left, each whole and finished."""
    exit_code, seconds, started = _signal_and_wait(main, signal.SIGTERM)
    assert exit_code == 143, _output(tmp_path)
    assert seconds < 10, seconds
    line = [x for x in _output(tmp_path).splitlines() if x.startswith("Interrupted")]
    assert len(line) == 1 and "(by SIGTERM)" in line[0] and "nothing written for it" in line[0], _output(tmp_path)
    assert "Traceback" not in _output(tmp_path)
    _gone(started, 5)
    records = _records(tmp_path / "out")
    for path in records:
        assert json.loads(path.read_text())["status"] == "ok"
    return records


@pytest.mark.slow
def test_sigterm_between_rows_keeps_the_finished_rows(tmp_path: Path) -> None:
    main = _speed(tmp_path, epochs=2)
    _wait_for(lambda: bool(_records(tmp_path / "out")) or main.poll() is not None, 120, "the first row's record")
    records = _stopped_speed_run(tmp_path, main)
    assert records and records[0].name == "naive-1.json"


@pytest.mark.slow
def test_sigterm_within_a_row_abandons_it(tmp_path: Path) -> None:
    main = _speed(tmp_path, epochs=400)
    _wait_for(lambda: "naive-1" in _output(tmp_path) or main.poll() is not None, 60, "the first row's epochs")
    assert main.poll() is None, _output(tmp_path)
    assert _stopped_speed_run(tmp_path, main) == []


def _launch(tmp_path: Path) -> subprocess.Popen[bytes]:
    """A long row under `launch --nproc 2`, its two ranks past their start-up and into the row."""
    configs = tiny_configs(tmp_path / "cfg")
    args = ["launch", "--nproc", "2", "--", "speed", "resnet101", "--pipeline", "2", "--engine", "distributed"]
    args += ["--profile", "quick", "--epochs", "400", "--quiet", "--output", str(tmp_path / "out")]
    main = _start(args, tmp_path, GPIPE_BENCH_CONFIGS=configs)
    _wait_for(lambda: len(_tree(main)) >= 2 or main.poll() is not None, 60, "the ranks")
    time.sleep(8)
    return main


@pytest.mark.slow
def test_sigterm_to_a_launch_stops_every_rank(tmp_path: Path) -> None:
    main = _launch(tmp_path)
    assert main.poll() is None, _output(tmp_path)
    exit_code, seconds, started = _signal_and_wait(main, signal.SIGTERM)
    assert exit_code == 143, _output(tmp_path)
    assert seconds < 15, seconds
    assert "interrupted; the ranks were stopped" in _output(tmp_path)
    assert _records(tmp_path / "out") == []
    _gone(started, 5)


@pytest.mark.slow
def test_a_killed_launch_leaves_no_rank_behind(tmp_path: Path) -> None:
    main = _launch(tmp_path)
    exit_code, _, started = _signal_and_wait(main, signal.SIGKILL)
    assert exit_code == -signal.SIGKILL
    _gone(started, 10)
