"""The `host` execution backend, with real processes."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from expbuild.config import LimitsSettings
from expbuild.worker.execution import ExecutionRequest
from expbuild.worker.host import DEFAULT_PATH, HostExecutor
from tests.survivors import is_gone, marker_seconds, none_left, wait_for_processes
from tests.waiting import wait_until

SH = "/bin/sh"


def request(
    tmp_path: Path,
    *arguments: str,
    environment: dict[str, str] | None = None,
    working_directory: Path | None = None,
    timeout: float | None = None,
) -> ExecutionRequest:
    return ExecutionRequest(
        arguments=list(arguments),
        environment=environment if environment is not None else {},
        working_directory=working_directory or tmp_path,
        stdout_path=tmp_path / "stdout",
        stderr_path=tmp_path / "stderr",
        timeout=timeout,
    )


def stdout(tmp_path: Path) -> str:
    return (tmp_path / "stdout").read_text()


def stderr(tmp_path: Path) -> str:
    return (tmp_path / "stderr").read_text()


async def read_pid(path: Path) -> int:
    written = await wait_until(
        lambda: path.exists() and path.read_text().strip(), what=f"a pid in {path}"
    )
    return int(written)


async def wait_gone(pid: int) -> None:
    await wait_until(lambda: is_gone(pid), what=f"pid {pid} to end")


async def test_exit_code_zero_and_output_to_files(tmp_path):
    outcome = await HostExecutor().execute(request(tmp_path, SH, "-c", "echo out; echo err >&2"))
    assert outcome.exit_code == 0
    assert not outcome.timed_out
    assert outcome.started_at <= outcome.completed_at
    assert stdout(tmp_path) == "out\n"
    assert stderr(tmp_path) == "err\n"


async def test_nonzero_exit_code(tmp_path):
    outcome = await HostExecutor().execute(request(tmp_path, SH, "-c", "exit 3"))
    assert outcome.exit_code == 3
    assert not outcome.timed_out


async def test_death_by_signal_reported_as_128_plus_signal(tmp_path):
    outcome = await HostExecutor().execute(request(tmp_path, SH, "-c", "kill -TERM $$"))
    assert outcome.exit_code == 128 + 15


async def test_large_output_goes_to_file(tmp_path):
    outcome = await HostExecutor().execute(request(tmp_path, SH, "-c", "head -c 5000000 /dev/zero"))
    assert outcome.exit_code == 0
    assert (tmp_path / "stdout").stat().st_size == 5_000_000


async def test_environment_is_exactly_the_commands(tmp_path):
    outcome = await HostExecutor().execute(
        request(tmp_path, "env", environment={"GREETING": "hello world", "PATH": "/usr/bin:/bin"})
    )
    assert outcome.exit_code == 0
    lines = sorted(stdout(tmp_path).splitlines())
    assert lines == ["GREETING=hello world", "PATH=/usr/bin:/bin"]


async def test_default_path_when_command_sets_none(tmp_path):
    outcome = await HostExecutor().execute(request(tmp_path, "env", environment={"A": "1"}))
    assert outcome.exit_code == 0
    assert sorted(stdout(tmp_path).splitlines()) == ["A=1", f"PATH={DEFAULT_PATH}"]


async def test_working_directory_is_honoured(tmp_path):
    workdir = tmp_path / "root" / "sub" / "dir"
    workdir.mkdir(parents=True)
    (workdir / "data.txt").write_text("here\n")
    outcome = await HostExecutor().execute(
        request(tmp_path, SH, "-c", "pwd; cat data.txt", working_directory=workdir)
    )
    assert outcome.exit_code == 0
    assert stdout(tmp_path) == f"{workdir}\nhere\n"


async def test_program_found_on_relative_path_entry(tmp_path):
    workdir = tmp_path / "root"
    (workdir / "tools").mkdir(parents=True)
    tool = workdir / "tools" / "greet"
    tool.write_text('#!/bin/sh\necho greeted "$@"\n')
    tool.chmod(0o755)
    outcome = await HostExecutor().execute(
        request(
            tmp_path,
            "greet",
            "you",
            environment={"PATH": "tools:/usr/bin:/bin"},
            working_directory=workdir,
        )
    )
    assert outcome.exit_code == 0
    assert stdout(tmp_path) == "greeted you\n"


async def test_relative_program_path_is_relative_to_working_directory(tmp_path):
    workdir = tmp_path / "root"
    workdir.mkdir()
    script = workdir / "run.sh"
    script.write_text("#!/bin/sh\necho argv0=$0\n")
    script.chmod(0o755)
    outcome = await HostExecutor().execute(request(tmp_path, "./run.sh", working_directory=workdir))
    assert outcome.exit_code == 0
    assert stdout(tmp_path) == "argv0=./run.sh\n"


async def test_missing_program_is_127_with_a_message(tmp_path):
    outcome = await HostExecutor().execute(request(tmp_path, "no-such-program-xyz", "arg"))
    assert outcome.exit_code == 127
    assert not outcome.timed_out
    message = stderr(tmp_path)
    assert "no-such-program-xyz: command not found" in message
    assert DEFAULT_PATH in message


async def test_missing_program_with_slash_is_127(tmp_path):
    outcome = await HostExecutor().execute(request(tmp_path, "./missing.sh"))
    assert outcome.exit_code == 127
    assert "./missing.sh: cannot execute" in stderr(tmp_path)


async def test_non_executable_program_is_126(tmp_path):
    script = tmp_path / "plain.sh"
    script.write_text("echo hi\n")
    script.chmod(0o644)
    outcome = await HostExecutor().execute(request(tmp_path, "./plain.sh"))
    assert outcome.exit_code == 126
    assert "./plain.sh: cannot execute: Permission denied" in stderr(tmp_path)


async def test_bare_name_that_is_not_executable_is_not_found(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_text("echo hi\n")
    outcome = await HostExecutor().execute(request(tmp_path, "tool", environment={"PATH": "bin"}))
    assert outcome.exit_code == 127


async def test_empty_arguments_fail_cleanly(tmp_path):
    outcome = await HostExecutor().execute(request(tmp_path))
    assert outcome.exit_code == 127
    assert "no arguments" in stderr(tmp_path)


async def test_stdin_is_empty(tmp_path):
    outcome = await HostExecutor().execute(request(tmp_path, "cat"))
    assert outcome.exit_code == 0
    assert stdout(tmp_path) == ""


async def test_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    started = time.monotonic()
    outcome = await HostExecutor().execute(
        request(
            tmp_path,
            SH,
            "-c",
            f"sleep 300 & echo $! > {pid_file}; echo started; wait",
            timeout=0.5,
        )
    )
    assert outcome.timed_out
    assert time.monotonic() - started < 10
    assert outcome.exit_code != 0
    assert stdout(tmp_path) == "started\n"
    grandchild = await read_pid(pid_file)
    await wait_gone(grandchild)


async def test_timeout_escalates_to_sigkill(tmp_path):
    pid_file = tmp_path / "pid"
    outcome = await HostExecutor(terminate_grace=0.3).execute(
        request(
            tmp_path,
            SH,
            "-c",
            f"trap '' TERM; echo $$ > {pid_file}; while :; do sleep 0.1; done",
            timeout=0.3,
        )
    )
    assert outcome.timed_out
    assert outcome.exit_code == 128 + 9
    await wait_gone(await read_pid(pid_file))


async def test_background_process_does_not_outlive_the_action(tmp_path):
    pid_file = tmp_path / "background.pid"
    outcome = await HostExecutor().execute(
        request(tmp_path, SH, "-c", f"sleep 300 > /dev/null 2>&1 & echo $! > {pid_file}")
    )
    assert outcome.exit_code == 0
    await wait_gone(await read_pid(pid_file))


async def test_cancellation_kills_the_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    job = asyncio.create_task(
        HostExecutor().execute(
            request(tmp_path, SH, "-c", f"sleep 300 & echo $! > {pid_file}; wait")
        )
    )
    grandchild = await read_pid(pid_file)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    await wait_gone(grandchild)


async def test_actions_run_concurrently(tmp_path):
    executor = HostExecutor()
    dirs = [tmp_path / str(i) for i in range(3)]
    for d in dirs:
        d.mkdir()
    # A barrier: each action signs in and waits (up to 30 s, then fails) until all three
    # have, which only actions running side by side can do.
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    script = (
        f"touch {barrier}/$$; i=0; "
        f'while [ "$(ls {barrier} | wc -l)" -lt 3 ]; do '
        "i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.05; done"
    )
    outcomes = await asyncio.gather(*(executor.execute(request(d, SH, "-c", script)) for d in dirs))
    assert [o.exit_code for o in outcomes] == [0, 0, 0]


def test_default_path_is_documented_value():
    assert DEFAULT_PATH == "/usr/local/bin:/usr/bin:/bin"
    assert os.pathsep == ":"


# -- no process survives its action, however it detached ---------------------------------

# With cgroups (when the worker may create them) and without: the launcher's subreaper
# alone must catch daemons that double-forked into a new session.
CONTAINMENT = [
    pytest.param(LimitsSettings(cgroups=True), id="cgroup"),
    pytest.param(LimitsSettings(cgroups=False), id="subreaper"),
]
DAEMONIZE = "setsid sh -c 'sleep {marker} & sleep {marker}' > /dev/null 2>&1 < /dev/null &"


@pytest.mark.parametrize("limits", CONTAINMENT)
async def test_daemonized_grandchildren_do_not_outlive_the_action(tmp_path, limits):
    marker = marker_seconds()
    name = f"daemonized-{uuid.uuid4().hex[:8]}"
    job = replace(
        request(tmp_path, SH, "-c", DAEMONIZE.format(marker=marker) + " sleep 0.3; echo done"),
        name=name,
    )
    executor = HostExecutor(limits=limits, pool_key=str(tmp_path))
    outcome = await executor.execute(job)
    assert outcome.exit_code == 0
    assert stdout(tmp_path) == "done\n"
    assert await none_left(marker)
    pool = executor.supervisor.pool
    if pool is not None:
        # The action's cgroup went back to the pool empty; closing removes it.
        (group,) = pool.idle
        assert group.pids_alive() == set()
        directories = list(group.directories)
        await executor.close()
        assert not any(d.exists() for d in directories)


@pytest.mark.parametrize("limits", CONTAINMENT)
async def test_daemons_die_with_a_timed_out_action(tmp_path, limits):
    marker = marker_seconds()
    outcome = await HostExecutor(limits=limits).execute(
        request(
            tmp_path, SH, "-c", DAEMONIZE.format(marker=marker) + f" sleep {marker}", timeout=0.5
        )
    )
    assert outcome.timed_out
    assert await none_left(marker)


@pytest.mark.parametrize("limits", CONTAINMENT)
async def test_daemons_die_with_a_cancelled_action(tmp_path, limits):
    marker = marker_seconds()
    job = asyncio.create_task(
        HostExecutor(limits=limits).execute(
            request(tmp_path, SH, "-c", DAEMONIZE.format(marker=marker) + " wait; sleep 300")
        )
    )
    await wait_for_processes(f"sleep {marker}")
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert await none_left(marker)


async def test_the_action_sees_no_descriptor_of_the_worker(tmp_path):
    outcome = await HostExecutor().execute(request(tmp_path, "ls", "/proc/self/fd"))
    assert outcome.exit_code == 0
    # stdin, stdout, stderr, and the directory ls itself opened.
    assert len(stdout(tmp_path).split()) <= 4


async def test_sigpipe_has_its_default_action(tmp_path):
    """The launcher is Python, which ignores SIGPIPE; the command must not inherit that."""
    outcome = await HostExecutor().execute(
        request(tmp_path, SH, "-c", "yes | head -n 1", timeout=10)
    )
    assert not outcome.timed_out
    assert outcome.exit_code == 0
    assert stdout(tmp_path) == "y\n"
