"""The `docker` backend against a real Docker engine (started here when none answers).

The session fixture reuses a running engine or starts `dockerd` (root, docker.io
installed) and imports a busybox image; without one these tests skip with the reason.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from google.rpc import code_pb2

from expbuild.client.actions import build_command
from expbuild.config import BackendSettings, LimitsSettings
from expbuild.errors import FailedPrecondition
from expbuild.worker.agent import WorkerAgent
from expbuild.worker.docker import DockerExecutor
from expbuild.worker.execution import ExecutionRequest
from tests.docker_engine import TEST_IMAGE, EngineUnavailable, docker_engine
from tests.survivors import marker_seconds, none_left, running_with
from tests.test_worker_agent import (  # noqa: F401 (client, server: fixtures)
    client,
    running_agent,
    server,
    settings_for,
)

IMAGE = f"docker://{TEST_IMAGE}"


@pytest.fixture(scope="session")
def docker(tmp_path_factory):
    try:
        with docker_engine(tmp_path_factory.mktemp("dockerd")) as engine:
            yield engine
    except EngineUnavailable as exc:
        pytest.skip(f"no Docker engine: {exc}")


def request(
    tmp_path: Path,
    *arguments: str,
    image: str | None = IMAGE,
    network: str | None = None,
    environment: dict[str, str] | None = None,
    working_directory: str = "",
    timeout: float | None = None,
) -> ExecutionRequest:
    root = tmp_path / "root"
    (root / working_directory).mkdir(parents=True, exist_ok=True)
    platform: dict[str, tuple[str, ...]] = {}
    if image:
        platform["container-image"] = (image,)
    if network:
        platform["network"] = (network,)
    return ExecutionRequest(
        arguments=list(arguments),
        environment=environment or {},
        working_directory=root / working_directory,
        stdout_path=tmp_path / "stdout",
        stderr_path=tmp_path / "stderr",
        timeout=timeout,
        input_root=root,
        platform=platform,
        name=f"test-{uuid.uuid4().hex[:12]}",
    )


def stdout(tmp_path: Path) -> str:
    return (tmp_path / "stdout").read_text()


def containers_named(name: str) -> list[str]:
    listing = subprocess.run(
        ["docker", "ps", "--all", "--quiet", "--filter", f"name=^/{name}$"],
        capture_output=True,
        text=True,
        check=True,
    )
    return listing.stdout.split()


async def wait_for_container(name: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        listing = await asyncio.to_thread(
            subprocess.run,
            [
                "docker",
                "ps",
                "--quiet",
                "--filter",
                f"name=^/{name}$",
                "--filter",
                "status=running",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        if listing.stdout.strip():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"container {name} never ran")


async def test_runs_in_the_image_with_the_input_root_as_working_directory(docker, tmp_path):
    executor = DockerExecutor()
    job = request(
        tmp_path,
        "sh",
        "-c",
        "pwd; cat ../in.txt; echo made > out.txt; echo $GREETING; ls /bin/busybox",
        working_directory="sub",
        environment={"GREETING": "hello container"},
    )
    (tmp_path / "root" / "in.txt").write_text("input\n")
    outcome = await executor.execute(job)
    assert outcome.exit_code == 0, (tmp_path / "stderr").read_text()
    assert outcome.limit_exceeded is None
    assert stdout(tmp_path) == "/work/sub\ninput\nhello container\n/bin/busybox\n"
    assert (tmp_path / "root" / "sub" / "out.txt").read_text() == "made\n"
    assert containers_named(f"expbuild-{job.name}") == []  # removed after the run


async def test_exit_code_and_stderr(docker, tmp_path):
    outcome = await DockerExecutor().execute(request(tmp_path, "sh", "-c", "echo oops >&2; exit 3"))
    assert outcome.exit_code == 3
    assert (tmp_path / "stderr").read_text() == "oops\n"


async def test_network_is_off_unless_the_platform_asks(docker, tmp_path):
    executor = DockerExecutor()
    assert (await executor.execute(request(tmp_path, "ls", "/sys/class/net"))).exit_code == 0
    assert stdout(tmp_path).split() == ["lo"]
    on = await executor.execute(request(tmp_path, "ls", "/sys/class/net", network="on"))
    assert on.exit_code == 0
    assert "eth0" in stdout(tmp_path).split()


async def test_no_container_image_is_a_failed_precondition(docker, tmp_path):
    with pytest.raises(
        FailedPrecondition,
        match="^platform property container-image is required for the docker backend$",
    ):
        await DockerExecutor().execute(request(tmp_path, "true", image=None))


async def test_an_image_not_on_the_engine_fails_at_once_without_pulling(docker, tmp_path):
    started = time.monotonic()
    with pytest.raises(
        FailedPrecondition, match="not present on the worker's Docker engine.*never pulls"
    ):
        await DockerExecutor().execute(
            request(tmp_path, "true", image="docker://registry.invalid/nothing:1")
        )
    assert time.monotonic() - started < 10


async def test_missing_program_is_127_with_a_message(docker, tmp_path):
    outcome = await DockerExecutor().execute(request(tmp_path, "no-such-program-xyz"))
    assert outcome.exit_code == 127
    # The container's init (docker --init) reports it: "exec no-such-program-xyz failed".
    message = (tmp_path / "stderr").read_text()
    assert "no-such-program-xyz" in message and "No such file or directory" in message


async def test_timeout_stops_and_removes_the_container(docker, tmp_path):
    marker = marker_seconds()
    job = request(tmp_path, "sh", "-c", f"echo before; sleep {marker}", timeout=1)
    started = time.monotonic()
    outcome = await DockerExecutor().execute(job)
    assert outcome.timed_out
    assert outcome.exit_code in (128 + 15, 128 + 9)
    assert time.monotonic() - started < 15
    assert stdout(tmp_path) == "before\n"
    assert await none_left(marker)
    assert containers_named(f"expbuild-{job.name}") == []


async def test_cancellation_stops_the_container(docker, tmp_path):
    marker = marker_seconds()
    job = request(tmp_path, "sleep", marker)
    running = asyncio.create_task(DockerExecutor().execute(job))
    await wait_for_container(f"expbuild-{job.name}")
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert await none_left(marker)
    assert containers_named(f"expbuild-{job.name}") == []


async def test_memory_limit_is_reported_as_such(docker, tmp_path):
    executor = DockerExecutor(limits=LimitsSettings(memory=32 * 1024 * 1024))
    hog = 'x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo ${#x}'
    outcome = await executor.execute(request(tmp_path, "sh", "-c", hog))
    assert outcome.exit_code == 137
    assert outcome.limit_exceeded == "action exceeded its memory limit of 32MiB"


async def test_cpu_time_limit_is_reported_as_such(docker, tmp_path):
    executor = DockerExecutor(limits=LimitsSettings(cpu_time=1))
    outcome = await executor.execute(request(tmp_path, "sh", "-c", "while :; do :; done"))
    assert outcome.exit_code == 128 + 24
    assert outcome.limit_exceeded == "action exceeded its CPU time limit of 1s (SIGXCPU)"


async def test_limits_become_container_settings(docker, tmp_path):
    limits = LimitsSettings(memory=64 * 1024 * 1024, cpus=0.5, max_processes=20)
    executor = DockerExecutor(limits=limits)
    args = executor.create_arguments(request(tmp_path, "true"), TEST_IMAGE, "n")
    for flag, value in (
        ("--memory", "67108864"),
        ("--cpus", "0.5"),
        ("--pids-limit", "20"),
        ("--network", "none"),
        ("--pull", "never"),
    ):
        assert args[args.index(flag) + 1] == value
    # And the engine applies them: more processes than allowed cannot start.
    script = "for i in $(seq 40); do sleep 5 & done 2>/dev/null; echo started; wait"
    outcome = await executor.execute(request(tmp_path, "sh", "-c", script))
    assert "can't fork" in (tmp_path / "stderr").read_text() or outcome.exit_code != 0


def test_offers_the_engines_images(docker):
    offers = DockerExecutor().platform()
    assert IMAGE in offers["container-image"]
    assert "docker://expbuild-test-busybox" in offers["container-image"]  # :latest implied
    assert offers["network"] == ("off", "on")


# -- through the real server and WorkerAgent -------------------------------------------------


async def test_end_to_end_through_the_server(docker, client, tmp_path):  # noqa: F811
    settings = settings_for(client.app.port, tmp_path / "work")
    settings = replace(
        settings,
        backend=BackendSettings(type="docker", work_dir=str(tmp_path / "work"), run_as="root"),
    )
    agent = WorkerAgent(settings)
    assert IMAGE in agent.platform()["container-image"]
    in_image = build_command(
        ["sh", "-c", "tr a-z A-Z < in.txt > out/upper.txt; cat /proc/1/cmdline | tr '\\0' ' '"],
        output_paths=["out/upper.txt"],
        platform={"container-image": IMAGE},
    )
    no_image = build_command(["true"], platform={"network": "off"})
    async with running_agent(agent):
        ran = await client.submit([], files={"in.txt": b"shout\n"}, command=in_image)
        refused = await client.submit([], command=no_image)
        ran_response = await client.response(ran)
        refused_response = await client.response(refused)

    assert ran_response.status.code == code_pb2.OK, ran_response.status.message
    assert ran_response.result.exit_code == 0
    (output,) = ran_response.result.output_files
    assert await client.read(output.digest) == b"SHOUT\n"
    assert b"init" in await client.read(ran_response.result.stdout_digest)  # --init is PID 1

    assert refused_response.status.code == code_pb2.FAILED_PRECONDITION
    assert refused_response.status.message == (
        "platform property container-image is required for the docker backend"
    )
    assert list((tmp_path / "work").iterdir()) == []
    assert running_with(str(tmp_path / "work")) == []
