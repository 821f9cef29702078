"""Stopping real worker processes: SIGTERM to a busy worker, Ctrl+C to `expbuild up`.

Both run the installed entry points under this venv's interpreter (Python 3.11 here),
where a thread started during interpreter finalization blocks forever: the processes
must leave on their own, with nothing left behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from expbuild.worker.agent import DEFAULT_SHUTDOWN_GRACE
from tests.processes import expbuild_up, wait_for_log
from tests.test_failover import replica, submit, worker
from tests.waiting import wait_until_sync

pytestmark = pytest.mark.e2e


def exits_within(process: subprocess.Popen, seconds: float) -> int | None:
    """The exit status if the process ends within `seconds`, else None (it is left running)."""
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def test_sigterm_lets_a_busy_worker_finish_its_action_and_exit(database_url, tmp_path):
    address, server = replica("server", database_url, tmp_path)
    runs = tmp_path / "runs"
    busy = worker("busy", address, tmp_path)
    try:
        client = submit(address, tmp_path, "sh", "-c", f"echo run >> {runs}; sleep 2; echo done")
        wait_for_log(busy, "Executing command:")
        busy.popen.send_signal(signal.SIGTERM)
        status = exits_within(busy.popen, DEFAULT_SHUTDOWN_GRACE + 5)
        assert status == 0, f"worker exit status {status}:\n{busy.log()}"
        assert "stopped" in busy.log()
        out, err = client.communicate(timeout=30)
        report = json.loads(out)
        assert report["exit_code"] == 0 and report["stdout"] == "done\n", err
        assert report["worker"] == "busy"
        assert runs.read_text() == "run\n"  # it ran once: finished, not handed back
    finally:
        busy.stop(signal.SIGKILL)
        server.stop()


def ancestry(pid: int) -> list[int]:
    """`pid` and its ancestors, from /proc."""
    chain = [pid]
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def started_by(root: int, home: Path) -> set[int]:
    """Live processes below `root`, or naming `home` (the embedded PostgreSQL daemonizes)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if pid != root and (root in ancestry(pid) or str(home).encode() in cmdline):
            if alive(pid):
                found.add(pid)
    return found


def test_ctrl_c_of_expbuild_up_leaves_no_process_behind(tmp_path):
    with expbuild_up() as (up, home, address):
        client = submit(address, home, "sh", "-c", "echo hello")
        out, err = client.communicate(timeout=60)
        assert json.loads(out)["exit_code"] == 0, err
        children = started_by(up.popen.pid, home)
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
        # What `up` started: the launcher zygote and the embedded PostgreSQL at least.
        assert any(b"--zygote" in c for c in cmdlines), cmdlines
        assert any(b"postgres" in c for c in cmdlines), cmdlines

        up.popen.send_signal(signal.SIGINT)
        status = exits_within(up.popen, 10)
        assert status == 0, f"expbuild up exit status {status}:\n{up.log()}"
        wait_until_sync(
            lambda: not any(alive(pid) for pid in children),
            timeout=10,
            what=f"every child of `up` gone (of {cmdlines})",
        )


EXECUTOR_LEFT_AT_EXIT = """
import asyncio, sys
from pathlib import Path
from expbuild.worker.execution import ExecutionRequest
from expbuild.worker.host import HostExecutor

# Still referenced at exit: collected only during interpreter finalization.
EXECUTOR = HostExecutor()
work = Path(sys.argv[1])
request = ExecutionRequest(
    arguments=["true"], environment={}, working_directory=work,
    stdout_path=work / "stdout", stderr_path=work / "stderr", timeout=10,
)
print(asyncio.run(EXECUTOR.execute(request)).exit_code, flush=True)
"""


def test_an_executor_collected_at_interpreter_exit_does_not_hang_it(tmp_path):
    # Its zygote is alive then; letting it go used to start a reaper thread, which
    # blocks forever during finalization on Python 3.11.
    script = tmp_path / "script.py"
    script.write_text(EXECUTOR_LEFT_AT_EXIT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    status = exits_within(process, 20)
    if status is None:
        process.kill()
    assert status == 0
    assert process.communicate()[0] == "0\n"
