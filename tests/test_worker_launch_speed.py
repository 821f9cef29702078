"""The launcher zygote: each action's launcher is a fork of one long-lived process.

The exec path (a fresh `python launcher.py` per action) stays the reference and the
fallback; these tests check that the zygote is reused, restarted when it dies, bypassed
for oversize messages, leaks no descriptor into the action, and print what it saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from expbuild.config import LimitsSettings
from expbuild.worker.execution import ExecutionRequest
from expbuild.worker.host import HostExecutor
from expbuild.worker.supervisor import ZYGOTE_MAX_MESSAGE, Supervisor
from tests.survivors import is_gone, marker_seconds, none_left, wait_for_processes
from tests.waiting import wait_until

SH = "/bin/sh"


def request(tmp_path: Path, *arguments: str, timeout: float | None = 30) -> ExecutionRequest:
    return ExecutionRequest(
        arguments=list(arguments),
        environment={},
        working_directory=tmp_path,
        stdout_path=tmp_path / "stdout",
        stderr_path=tmp_path / "stderr",
        timeout=timeout,
    )


def stdout(tmp_path: Path) -> str:
    return (tmp_path / "stdout").read_text()


def count_exec_starts(monkeypatch, executor: HostExecutor) -> list[int]:
    calls: list[int] = []
    original = executor.supervisor._start_exec

    async def counted(*args, **kwargs):
        calls.append(1)
        return await original(*args, **kwargs)

    monkeypatch.setattr(executor.supervisor, "_start_exec", counted)
    return calls


async def test_the_zygote_is_reused_across_actions(tmp_path, monkeypatch):
    executor = HostExecutor()
    exec_starts = count_exec_starts(monkeypatch, executor)
    pids = set()
    for n in range(5):
        outcome = await executor.execute(request(tmp_path, SH, "-c", f"echo {n}"))
        assert outcome.exit_code == 0
        assert stdout(tmp_path) == f"{n}\n"
        pids.add(executor.supervisor.zygote.pid)
    assert len(pids) == 1 and None not in pids
    assert exec_starts == []


async def test_concurrent_actions_share_the_zygote(tmp_path, monkeypatch):
    executor = HostExecutor()
    exec_starts = count_exec_starts(monkeypatch, executor)
    dirs = [tmp_path / str(n) for n in range(8)]
    for d in dirs:
        d.mkdir()
    outcomes = await asyncio.gather(
        *(
            executor.execute(request(d, SH, "-c", f"sleep 0.2; echo {n}"))
            for n, d in enumerate(dirs)
        )
    )
    assert [o.exit_code for o in outcomes] == [0] * 8
    assert [stdout(d) for d in dirs] == [f"{n}\n" for n in range(8)]
    assert exec_starts == []


async def test_a_killed_zygote_is_restarted(tmp_path, monkeypatch):
    executor = HostExecutor()
    exec_starts = count_exec_starts(monkeypatch, executor)
    assert (await executor.execute(request(tmp_path, "true"))).exit_code == 0
    first = executor.supervisor.zygote.pid
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: is_gone(first), what=f"the zygote {first} to end")
    outcome = await executor.execute(request(tmp_path, SH, "-c", "echo again"))
    assert outcome.exit_code == 0
    assert stdout(tmp_path) == "again\n"
    second = executor.supervisor.zygote.pid
    assert second is not None and second != first
    assert exec_starts == []


async def test_an_action_whose_zygote_dies_is_stopped_not_lost(tmp_path):
    executor = HostExecutor()
    marker = marker_seconds()
    job = asyncio.create_task(executor.execute(request(tmp_path, SH, "-c", f"sleep {marker}")))
    await wait_for_processes(f"sleep {marker}")
    os.kill(executor.supervisor.zygote.pid, signal.SIGKILL)
    outcome = await asyncio.wait_for(job, 10)
    assert outcome.exit_code == 128 + signal.SIGTERM
    assert await none_left(marker)


async def test_an_oversize_command_takes_the_exec_path(tmp_path, monkeypatch):
    executor = HostExecutor()
    exec_starts = count_exec_starts(monkeypatch, executor)
    long = "x" * (ZYGOTE_MAX_MESSAGE + 1000)
    outcome = await executor.execute(request(tmp_path, SH, "-c", 'echo "${#1}"', "sh", long))
    assert outcome.exit_code == 0
    assert stdout(tmp_path) == f"{len(long)}\n"
    assert exec_starts == [1]
    # The next ordinary action goes through the zygote again.
    assert (await executor.execute(request(tmp_path, "true"))).exit_code == 0
    assert exec_starts == [1]
    assert executor.supervisor.zygote.pid is not None


async def test_without_a_zygote_the_exec_path_still_works(tmp_path, monkeypatch):
    executor = HostExecutor()
    executor.supervisor.zygote.usable = False
    exec_starts = count_exec_starts(monkeypatch, executor)
    outcome = await executor.execute(request(tmp_path, SH, "-c", "echo old"))
    assert outcome.exit_code == 0
    assert stdout(tmp_path) == "old\n"
    assert exec_starts == [1]
    assert executor.supervisor.zygote.pid is None


@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroup", "no-cgroup"])
async def test_no_descriptor_leaks_into_the_action(tmp_path, cgroups):
    executor = HostExecutor(limits=LimitsSettings(cgroups=cgroups))
    busy = tmp_path / "busy"
    busy.mkdir()
    listing = tmp_path / "listing"
    listing.mkdir()
    # Another action in flight: its reply socket and files are open in the zygote.
    marker = marker_seconds()
    other = asyncio.create_task(executor.execute(request(busy, "sleep", marker)))
    await wait_for_processes(f"sleep {marker}")
    outcome = await executor.execute(request(listing, SH, "-c", "exec ls -l /proc/self/fd/"))
    assert not other.done(), "the other action ended before the listing was taken"
    other.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await other
    assert outcome.exit_code == 0
    entries = {}
    for line in stdout(listing).splitlines():
        if "->" in line:
            name, target = line.split("->")
            entries[int(name.split()[-1])] = target.strip()
    # stdin, stdout, stderr, and the directory ls itself opened.
    assert set(entries) <= {0, 1, 2, 3}, entries
    assert entries[0] == "/dev/null"
    assert entries[1] == str(listing / "stdout")
    assert entries[2] == str(listing / "stderr")
    assert entries.get(3, "/proc").startswith("/proc/"), entries


async def test_timeout_and_exit_codes_through_the_zygote(tmp_path, monkeypatch):
    executor = HostExecutor(terminate_grace=0.3)
    exec_starts = count_exec_starts(monkeypatch, executor)
    assert (await executor.execute(request(tmp_path, SH, "-c", "exit 7"))).exit_code == 7
    outcome = await executor.execute(
        request(tmp_path, SH, "-c", "trap '' TERM; while :; do sleep 0.1; done", timeout=0.3)
    )
    assert outcome.timed_out
    assert outcome.exit_code == 128 + 9
    assert exec_starts == []


async def test_closing_the_control_socket_ends_the_zygote(tmp_path):
    supervisor = Supervisor(LimitsSettings(cgroups=False))
    executor = HostExecutor()
    executor.supervisor = supervisor
    assert (await executor.execute(request(tmp_path, "true"))).exit_code == 0
    process = supervisor.zygote.process
    await supervisor.close()  # waits until it left (it is killed after 10 s)
    assert process.returncode == 0
    assert supervisor.zygote.process is None


async def test_per_action_time_old_path_versus_zygote(tmp_path, capsys):
    """A measurement, printed, not asserted: `true` x 20 either way."""

    async def per_action(executor: HostExecutor) -> float:
        await executor.execute(request(tmp_path, "true"))  # warm up (starts the zygote)
        started = time.perf_counter()
        for _ in range(20):
            assert (await executor.execute(request(tmp_path, "true"))).exit_code == 0
        return (time.perf_counter() - started) / 20

    old = HostExecutor()
    old.supervisor.zygote.usable = False
    old_seconds = await per_action(old)
    zygote_seconds = await per_action(HostExecutor())
    with capsys.disabled():
        print(
            f"\nper-action wall time for `true` x 20: exec path {old_seconds * 1000:.1f} ms, "
            f"zygote {zygote_seconds * 1000:.1f} ms ({old_seconds / zygote_seconds:.1f}x)"
        )
