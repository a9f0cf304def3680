"""gpipe_bench.processes: commands under a time limit, and nothing they start outliving them.

The commands are small ``python -c`` scripts. Most start a "rank": a process
in a session of its own (as torchrun starts its ranks) that sleeps, which a
signal to the command's process group does not reach. Every test kills what
it started, also when it fails. Becoming a subreaper is tested in a child
interpreter, never in the test process itself, which would then adopt every
orphan of the rest of the run.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from gpipe_bench import processes
from helpers import kill_recorded, process_gone, rank_command, wait_for_file

ROOT = Path(__file__).resolve().parent.parent

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="walks /proc; subreapers are Linux's")


@pytest.fixture
def rank_pid_file(tmp_path: Path) -> Iterator[Path]:
    """Where the command writes its rank's pid; the rank is killed afterwards whatever happened."""
    path = tmp_path / "rank.pid"
    yield path
    kill_recorded(path)


def test_a_command_runs_to_its_end_with_its_output_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    script = "import os, sys; print(os.getcwd(), os.environ['WHO']); sys.exit(3)"
    run = processes.run_process(
        [sys.executable, "-c", script], log, 30, cwd=tmp_path, env={**os.environ, "WHO": "me"}, label="check"
    )
    assert (run.returncode, run.stopped, run.notes) == (3, "", [])
    first, second = log.read_text().splitlines()
    assert first == f"check: {sys.executable} -c {script}"
    assert second == f"{tmp_path} me"


@linux_only
@pytest.mark.timeout(30)
def test_past_its_limit_a_deaf_command_and_its_rank_in_another_session_are_killed(
    tmp_path: Path, rank_pid_file: Path
) -> None:
    # SIGTERM is ignored, so only SIGKILL ends the command; its rank is out of the process group.
    started = time.monotonic()
    run = processes.run_process(rank_command(rank_pid_file, "hang", deaf=True), tmp_path / "log", 2, grace_s=1)
    elapsed = time.monotonic() - started
    assert elapsed < 2 + 1 + 2, f"took {elapsed:.1f} s for a 2 s limit and 1 s grace"
    assert run.stopped == "time" and run.returncode == -signal.SIGKILL and run.notes == []
    assert process_gone(int(rank_pid_file.read_text()))
    assert (tmp_path / "log").read_text().splitlines()[-1] == "FIGURE: started"


@linux_only
@pytest.mark.timeout(30)
def test_stopped_ends_the_command_at_once_and_kills_the_rank_it_orphans(tmp_path: Path, rank_pid_file: Path) -> None:
    # The command exits on SIGTERM, orphaning its rank: only the list taken before the signal leads to it.
    def stopped() -> Optional[str]:
        return "SIGTERM" if rank_pid_file.exists() else None

    run = processes.run_process(rank_command(rank_pid_file, "hang"), tmp_path / "log", 30, grace_s=5, stopped=stopped)
    assert run.stopped == "SIGTERM" and run.returncode == -signal.SIGTERM
    assert run.seconds < 5, "the command ends on SIGTERM: no wait for the grace period"
    assert process_gone(int(rank_pid_file.read_text()))


# A child interpreter that becomes a subreaper, runs a command that exits leaving its rank, and
# reports what it saw: argv: the command as JSON.
SUBREAPER = """
import json, os, sys
from pathlib import Path
from gpipe_bench import processes
before = processes.is_subreaper()
became = processes.become_subreaper()
run = processes.run_process(json.loads(sys.argv[1]), Path(sys.argv[2]), 30, grace_s=1)
zombies = [p.pid for p in processes._processes() if p.ppid == os.getpid() and p.state == "Z"]
print(json.dumps({"before": before, "became": became, "now": processes.is_subreaper(),
                  "returncode": run.returncode, "notes": run.notes, "zombies": zombies}))
"""


@linux_only
@pytest.mark.timeout(60)
def test_a_subreaper_adopts_and_kills_the_rank_a_command_leaves_running(tmp_path: Path, rank_pid_file: Path) -> None:
    command = json.dumps(rank_command(rank_pid_file, "exit", code=3))
    done = subprocess.run(
        [sys.executable, "-c", SUBREAPER, command, str(tmp_path / "log")],
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    seen = json.loads(done.stdout)
    pid = int(rank_pid_file.read_text())
    assert (seen["before"], seen["became"], seen["now"]) == (False, True, True)
    assert seen["returncode"] == 3, "the command's own exit status, not one collected while reaping"
    assert seen["notes"] == [f"killed 1 process(es) the step left running: pid {pid}"]
    assert seen["zombies"] == []
    assert process_gone(pid)


@linux_only
@pytest.mark.timeout(30)
def test_a_commands_processes_include_its_ranks_and_stop_ends_them(tmp_path: Path, rank_pid_file: Path) -> None:
    with open(tmp_path / "log", "wb") as out:
        child = subprocess.Popen(
            rank_command(rank_pid_file, "hang", deaf=True), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_file(rank_pid_file)
        rank = int(rank_pid_file.read_text())
        found = processes.step_processes(child.pid, subreaper=False)
        assert {child.pid, rank} <= set(found)
        assert found[rank].session == rank != child.pid, "the rank leads a session of its own"
        started = time.monotonic()
        assert processes.stop(child, 0.5, subreaper=False) == []
        assert time.monotonic() - started < 0.5 + processes.KILL_WAIT_S
        assert child.returncode == -signal.SIGKILL and process_gone(rank)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@linux_only
@pytest.mark.timeout(30)
def test_a_command_name_with_spaces_and_parentheses_is_read(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = f"import time; open('/proc/self/comm', 'w').write('a) (b c'); open({str(ready)!r}, 'w'); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_for_file(ready)
        proc = processes._stat(child.pid)
        assert proc is not None
        assert (proc.pid, proc.ppid, proc.pgrp) == (child.pid, os.getpid(), os.getpgrp()) and proc.state in ("R", "S")
    finally:
        child.kill()
        child.wait()


@linux_only
def test_a_process_is_its_pid_and_its_start_time() -> None:
    # A pid reused by a new process is not the process that was listed: it is never signalled.
    me = processes._stat(os.getpid())
    assert me is not None and processes._alive(me)
    assert not processes._alive(dataclasses.replace(me, start=me.start + 1))


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names")
def test_the_module_imports_only_the_standard_library() -> None:
    source = Path(processes.__file__).read_text()
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names and names <= set(sys.stdlib_module_names) | {"__future__"}, names
    assert all(hasattr(processes, name) for name in processes.__all__)
