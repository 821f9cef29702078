"""`[worker.limits]`: actions that exceed a limit are stopped and told which one.

Real processes on the host and in bubblewrap sandboxes (the docker backend's limits are
in test_worker_docker.py), then the same through the real server and WorkerAgent.
Memory, process and CPU-share limits use a per-action cgroup where the worker may
create one (root here); the rlimit fallback is exercised with `cgroups = false`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from google.rpc import code_pb2

from expbuild.config import LimitsSettings
from expbuild.worker.agent import WorkerAgent
from expbuild.worker.cgroups import CgroupSupport
from expbuild.worker.execution import ExecutionRequest, Executor
from expbuild.worker.host import HostExecutor
from expbuild.worker.limits import SIGXCPU, capped_timeout, cpu_time_exceeded, format_size
from tests.serving import running_server, server_settings
from tests.test_worker_agent import client_of, running_agent, settings_for

MiB = 1024 * 1024
CGROUPS = CgroupSupport.detect()


def needs_cgroup(controller: str):
    available = CGROUPS is not None and (
        controller in CGROUPS.v1 or CGROUPS.unified is not None and _v2_offers(controller)
    )
    return pytest.mark.skipif(
        not available, reason=f"this worker may not create {controller} cgroups here"
    )


def _v2_offers(controller: str) -> bool:
    assert CGROUPS is not None and CGROUPS.unified is not None
    return controller in (CGROUPS.unified / "cgroup.controllers").read_text().split()


def sandbox(limits: LimitsSettings) -> Executor:
    from expbuild.worker.sandbox import SandboxExecutor

    return SandboxExecutor(limits=limits)


BACKENDS = [
    pytest.param(lambda limits: HostExecutor(limits=limits), id="host"),
    pytest.param(
        sandbox,
        id="sandbox",
        marks=pytest.mark.skipif(
            shutil.which("bwrap") is None, reason="bubblewrap is not installed"
        ),
    ),
]
Backend = Callable[[LimitsSettings], Executor]


@pytest.fixture
async def client(database_url, tmp_path):
    """A real server (PostgreSQL queue, file CAS) and a client of it; `client.app` is the server."""
    async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
        async with client_of(app, tmp_path) as connected:
            yield connected


def request(tmp_path: Path, *arguments: str, timeout: float | None = 30) -> ExecutionRequest:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    return ExecutionRequest(
        arguments=list(arguments),
        environment={"PATH": "/usr/bin:/bin"},
        working_directory=root,
        stdout_path=tmp_path / "stdout",
        stderr_path=tmp_path / "stderr",
        timeout=timeout,
        input_root=root,
    )


# dd allocates its whole block before reading: a memory hog in one standard command.
MEMORY_HOG = ("dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1")
CPU_HOG = ("sh", "-c", "while :; do :; done")


@pytest.mark.parametrize("backend", BACKENDS)
@needs_cgroup("memory")
async def test_memory_limit_by_cgroup(tmp_path, backend: Backend):
    executor = backend(LimitsSettings(memory=64 * MiB))
    outcome = await executor.execute(request(tmp_path, *MEMORY_HOG))
    assert outcome.limit_exceeded == "action exceeded its memory limit of 64MiB"
    assert outcome.exit_code == 128 + 9  # the kernel's OOM killer


@pytest.mark.parametrize("backend", BACKENDS)
async def test_memory_limit_by_rlimit(tmp_path, backend: Backend):
    executor = backend(LimitsSettings(memory=64 * MiB, cgroups=False))
    hog = ("python3", "-c", "x = bytearray(256 * 1024 * 1024)")
    outcome = await executor.execute(request(tmp_path, *hog))
    assert outcome.limit_exceeded == "action exceeded its memory limit of 64MiB"
    assert outcome.exit_code == 1  # Python's MemoryError; the exit code stays as it was
    assert "MemoryError" in (tmp_path / "stderr").read_text()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_cpu_time_limit(tmp_path, backend: Backend):
    outcome = await backend(LimitsSettings(cpu_time=1)).execute(request(tmp_path, *CPU_HOG))
    assert outcome.exit_code == 128 + 24
    assert outcome.limit_exceeded == "action exceeded its CPU time limit of 1s (SIGXCPU)"
    assert not outcome.timed_out


async def test_cpu_time_limit_of_a_process_ignoring_sigxcpu(tmp_path):
    stubborn = ("sh", "-c", "trap '' XCPU; while :; do :; done")
    outcome = await HostExecutor(limits=LimitsSettings(cpu_time=1)).execute(
        request(tmp_path, *stubborn)
    )
    assert outcome.exit_code == 128 + 9  # the hard limit, a second later
    assert outcome.limit_exceeded == "action exceeded its CPU time limit of 1s (SIGKILL)"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_file_size_backstop(tmp_path, backend: Backend):
    executor = backend(LimitsSettings(max_output_size=1 * MiB))
    outcome = await executor.execute(
        request(tmp_path, "sh", "-c", "head -c 3000000 /dev/zero > big")
    )
    assert outcome.exit_code == 128 + 25  # the shell reports head's SIGXFSZ
    assert outcome.limit_exceeded == (
        "action wrote a file larger than the 1MiB output limit ([worker.limits] max_output_size) (SIGXFSZ)"
    )
    assert (tmp_path / "root" / "big").stat().st_size == 1 * MiB


@pytest.mark.parametrize("backend", BACKENDS)
@needs_cgroup("pids")
async def test_process_limit(tmp_path, backend: Backend):
    executor = backend(LimitsSettings(max_processes=8))
    script = "for i in $(seq 20); do sleep 2 & done; wait"
    outcome = await executor.execute(request(tmp_path, "sh", "-c", script))
    assert outcome.exit_code != 0
    assert (
        outcome.limit_exceeded
        == "action exceeded its limit of 8 processes ([worker.limits] max_processes)"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@needs_cgroup("cpu")
async def test_cpu_share(tmp_path, backend: Backend):
    """A quarter of a CPU: a second of busy looping gets about a quarter second of CPU."""
    spin = (
        "python3",
        "-c",
        "import os, time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\n"
        "t = os.times(); print(t.user + t.system)",
    )
    outcome = await backend(LimitsSettings(cpus=0.25)).execute(request(tmp_path, *spin))
    assert outcome.exit_code == 0, (tmp_path / "stderr").read_text()
    assert float((tmp_path / "stdout").read_text()) < 0.8


@pytest.mark.parametrize("backend", BACKENDS)
async def test_within_limits_nothing_is_reported(tmp_path, backend: Backend):
    limits = LimitsSettings(
        memory=256 * MiB, cpu_time=5, max_output_size=10 * MiB, max_processes=50
    )
    outcome = await backend(limits).execute(request(tmp_path, "sh", "-c", "echo fine; exit 152"))
    # 152 looks like SIGXCPU, but no CPU time was used: it is just the exit code.
    assert outcome.exit_code == 152
    assert outcome.limit_exceeded is None
    assert (tmp_path / "stdout").read_text() == "fine\n"


def test_a_death_by_sigxcpu_is_the_cpu_limit_whatever_cpu_time_is_reported():
    # Under load the CPU time reported for a process its 1 s limit killed was 0.73 s here:
    # the kernel sent SIGXCPU, and only its limit does.
    limits = LimitsSettings(cpu_time=1)
    reason = cpu_time_exceeded(limits, SIGXCPU, 0.3, by_signal=True)
    assert reason == "action exceeded its CPU time limit of 1s (SIGXCPU)"


def test_an_exit_code_looking_like_sigxcpu_needs_the_cpu_time_to_back_it():
    limits = LimitsSettings(cpu_time=1)
    assert cpu_time_exceeded(limits, SIGXCPU, 0.0) is None  # `exit 152`
    # A shell reporting its child's SIGXCPU: the child's time trails the limit's count.
    assert cpu_time_exceeded(limits, SIGXCPU, 0.7) == (
        "action exceeded its CPU time limit of 1s (SIGXCPU)"
    )
    assert cpu_time_exceeded(LimitsSettings(), SIGXCPU, 5.0, by_signal=True) is None


def test_the_timeout_limit_caps_the_actions_own():
    limits = LimitsSettings(timeout=timedelta(seconds=5))
    assert capped_timeout(None, limits) == 5
    assert capped_timeout(60, limits) == 5
    assert capped_timeout(2, limits) == 2
    assert capped_timeout(None, LimitsSettings()) is None


def test_sizes_are_reported_in_binary_units():
    assert format_size(256 * MiB) == "256MiB"
    assert format_size(150 * MiB) == "150MiB"
    assert format_size(1536 * MiB) == "1.5GiB"
    assert format_size(1000) == "1000 bytes"


# -- through the real server and WorkerAgent ---------------------------------------------------


async def test_limits_end_to_end(client, tmp_path):
    # Two workers one after the other, so that no limit races the wall clock: the first
    # one's short timeout is all it checks; the second one has no timeout at all, so a
    # CPU hog on a loaded machine gets its 1 s of CPU however long that takes.
    timing_out = WorkerAgent(
        replace(
            settings_for(client.app.port, tmp_path / "work-1"),
            limits=LimitsSettings(timeout=timedelta(seconds=2)),
        )
    )
    async with running_agent(timing_out):
        slow = await client.submit(["sh", "-c", "echo before; sleep 30"])
        slow_response = await client.response(slow)

    work_dir = tmp_path / "work-2"
    limits = LimitsSettings(cpu_time=1, memory=64 * MiB, max_output_size=1 * MiB)
    agent = WorkerAgent(replace(settings_for(client.app.port, work_dir), limits=limits))
    half = 600 * 1024  # each file is within the per-file backstop, together over the total
    async with running_agent(agent):
        spinning = await client.submit(list(CPU_HOG))
        hog = await client.submit(list(MEMORY_HOG))
        large = await client.submit(
            ["sh", "-c", f"head -c {half} /dev/zero > a; head -c {half} /dev/zero > b; exit 4"],
            output_paths=("a", "b"),
        )
        fine = await client.submit(["sh", "-c", "echo small > a"], output_paths=("a",))
        spinning_response = await client.response(spinning)
        hog_response = await client.response(hog)
        large_response = await client.response(large)
        fine_response = await client.response(fine)

    # [worker.limits] timeout applies to an action that sets none (and caps longer ones).
    assert slow_response.status.code == code_pb2.DEADLINE_EXCEEDED
    assert slow_response.status.message == "action timed out after 2s"
    assert await client.read(slow_response.result.stdout_digest) == b"before\n"

    assert spinning_response.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert spinning_response.status.message == "action exceeded its CPU time limit of 1s (SIGXCPU)"
    assert spinning_response.result.exit_code == 128 + 24

    assert hog_response.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert hog_response.status.message == "action exceeded its memory limit of 64MiB"
    assert hog_response.result.exit_code != 0
    assert hog_response.message == hog_response.status.message

    assert large_response.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert large_response.status.message == (
        "outputs total 1.2MiB, over the 1MiB limit ([worker.limits] max_output_size)"
    )
    assert large_response.result.exit_code == 4
    assert not large_response.result.output_files  # nothing was uploaded

    assert fine_response.status.code == code_pb2.OK
    assert len(fine_response.result.output_files) == 1
    assert list(work_dir.iterdir()) == []  # every action directory is gone
