"""The `sandbox` backend: real bubblewrap sandboxes (skipped, with the reason, without bwrap)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from google.rpc import code_pb2

from expbuild.client.actions import build_command
from expbuild.config import BackendSettings, ConfigError
from expbuild.worker.agent import WorkerAgent
from expbuild.worker.execution import ExecutionRequest
from expbuild.worker.sandbox import SandboxExecutor, find_bwrap
from tests.survivors import marker_seconds, none_left, wait_for_processes
from tests.test_worker_agent import (  # noqa: F401 (client, server: fixtures)
    client,
    running_agent,
    server,
    settings_for,
)

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap is not installed (apt-get install bubblewrap)"
)


def request(
    tmp_path: Path,
    *arguments: str,
    working_directory: str = "",
    network: str | None = None,
    environment: dict[str, str] | None = None,
    timeout: float | None = None,
) -> ExecutionRequest:
    root = tmp_path / "root"
    (root / working_directory).mkdir(parents=True, exist_ok=True)
    return ExecutionRequest(
        arguments=list(arguments),
        environment=environment or {},
        working_directory=root / working_directory,
        stdout_path=tmp_path / "stdout",
        stderr_path=tmp_path / "stderr",
        timeout=timeout,
        input_root=root,
        platform={"network": (network,)} if network else {},
    )


def stdout(tmp_path: Path) -> str:
    return (tmp_path / "stdout").read_text()


def stderr(tmp_path: Path) -> str:
    return (tmp_path / "stderr").read_text()


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port on the host's loopback that accepts connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def connect_script(port: int) -> list[str]:
    return [
        "python3",
        "-c",
        f"import socket; socket.create_connection(('127.0.0.1', {port}), 3); print('connected')",
    ]


async def test_the_input_root_is_the_working_area(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "in.txt").write_text("input\n")
    outcome = await SandboxExecutor().execute(
        request(
            tmp_path,
            "sh",
            "-c",
            "pwd; cat ../in.txt; echo made > out.txt; ls /",
            working_directory="sub",
            environment={"PATH": "/usr/bin:/bin"},
        )
    )
    assert outcome.exit_code == 0, stderr(tmp_path)
    lines = stdout(tmp_path).splitlines()
    assert lines[:2] == ["/work/sub", "input"]
    # Only what was configured: the read-only host directories, the input root, the rest new.
    assert set(lines[2:]) <= {"bin", "dev", "etc", "lib", "lib64", "proc", "tmp", "usr", "work"}
    assert (tmp_path / "root" / "sub" / "out.txt").read_text() == "made\n"


async def test_environment_is_the_commands(tmp_path):
    outcome = await SandboxExecutor().execute(request(tmp_path, "env", environment={"A": "1"}))
    assert outcome.exit_code == 0
    # PATH defaults as on the host; bwrap sets PWD when it enters the working directory.
    assert sorted(stdout(tmp_path).splitlines()) == [
        "A=1",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "PWD=/work",
    ]


def static_busybox() -> str:
    busybox = shutil.which("busybox")
    if busybox is not None:
        ldd = subprocess.run(["ldd", busybox], capture_output=True, text=True, check=False)
        if "not a dynamic executable" in ldd.stdout + ldd.stderr:
            return busybox
    pytest.skip("needs a static busybox (apt-get install busybox-static)")


async def test_the_input_root_as_slash_in_root_mode(tmp_path):
    """BuildStream-style: the input root brings its own system (here: a static busybox)."""
    busybox = static_busybox()
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo", "pwd"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text("NAME=sysroot\n")
    executor = SandboxExecutor(BackendSettings(type="sandbox", sandbox_root="root"))
    outcome = await executor.execute(
        request(
            tmp_path,
            "sh",
            "-c",
            "pwd; cat /etc/os-release; ls /; echo built > /out.txt",
            working_directory="src",
            environment={"PATH": "/bin"},
        )
    )
    assert outcome.exit_code == 0, stderr(tmp_path)
    lines = stdout(tmp_path).splitlines()
    assert lines[:2] == ["/src", "NAME=sysroot"]
    assert sorted(lines[2:]) == ["bin", "dev", "etc", "proc", "src", "tmp"]
    assert (root / "out.txt").read_text() == "built\n"
    # The mount points bwrap made in the input root are gone again (not outputs).
    assert sorted(p.name for p in root.iterdir()) == ["bin", "etc", "out.txt", "src"]


async def test_no_network_by_default(tmp_path, listener):
    outcome = await SandboxExecutor().execute(request(tmp_path, *connect_script(listener)))
    assert outcome.exit_code != 0
    assert "Connection refused" in stderr(tmp_path) or "unreachable" in stderr(tmp_path)


async def test_network_when_the_platform_asks(tmp_path, listener):
    outcome = await SandboxExecutor().execute(
        request(tmp_path, *connect_script(listener), network="on")
    )
    assert outcome.exit_code == 0, stderr(tmp_path)
    assert stdout(tmp_path) == "connected\n"


async def test_private_tmp_and_read_only_system(tmp_path):
    name = f"expbuild-private-{uuid.uuid4().hex}"
    script = f"ls -A /tmp; echo secret > /tmp/{name}; cat /tmp/{name}; touch /usr/{name}"
    outcome = await SandboxExecutor().execute(request(tmp_path, "sh", "-c", script))
    assert stdout(tmp_path) == "secret\n"  # /tmp started empty and was writable
    assert not Path("/tmp", name).exists()
    assert outcome.exit_code != 0
    assert "Read-only file system" in stderr(tmp_path)
    assert not Path("/usr", name).exists()


async def test_own_pid_namespace(tmp_path):
    outcome = await SandboxExecutor().execute(
        request(tmp_path, "sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'")
    )
    assert outcome.exit_code == 0
    pid, count = stdout(tmp_path).split()
    assert int(pid) <= 3 and int(count) <= 4  # bwrap's init, the shell, ls, grep


async def test_exit_codes_and_missing_programs(tmp_path):
    executor = SandboxExecutor()
    assert (await executor.execute(request(tmp_path, "sh", "-c", "exit 3"))).exit_code == 3
    assert (await executor.execute(request(tmp_path, "sh", "-c", "kill -TERM $$"))).exit_code == 143
    missing = await executor.execute(request(tmp_path, "no-such-program-xyz"))
    assert missing.exit_code == 127
    assert "no-such-program-xyz: command not found in the sandbox" in stderr(tmp_path)


async def test_no_process_outlives_the_action(tmp_path):
    marker = marker_seconds()
    script = f"sleep {marker} & setsid sh -c 'sleep {marker}' & echo started"
    outcome = await SandboxExecutor().execute(request(tmp_path, "sh", "-c", script))
    assert outcome.exit_code == 0
    assert stdout(tmp_path) == "started\n"
    assert await none_left(marker)


async def test_timeout_kills_the_sandbox(tmp_path):
    marker = marker_seconds()
    outcome = await SandboxExecutor().execute(
        request(tmp_path, "sh", "-c", f"echo before; sleep {marker} & sleep {marker}", timeout=0.5)
    )
    assert outcome.timed_out
    assert stdout(tmp_path) == "before\n"
    assert await none_left(marker)


async def test_cancellation_kills_the_sandbox(tmp_path):
    marker = marker_seconds()
    job = asyncio.create_task(SandboxExecutor().execute(request(tmp_path, "sleep", marker)))
    await wait_for_processes(f"sleep {marker}")
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert await none_left(marker)


def test_a_missing_bwrap_is_a_clear_configuration_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="install the bubblewrap package"):
        find_bwrap()


def test_offers_network_choice():
    assert SandboxExecutor().platform() == {"network": ("off", "on")}


async def test_end_to_end_through_the_server(client, tmp_path, listener):  # noqa: F811
    work_dir = tmp_path / "work"
    settings = replace(
        settings_for(client.app.port, work_dir),
        backend=BackendSettings(type="sandbox", work_dir=str(work_dir), run_as="root"),
    )
    agent = WorkerAgent(settings)
    assert agent.platform()["network"] == ("off", "on")  # the backend's offer ...
    configured = WorkerAgent(replace(settings, platform={"network": ("off",)}))
    assert configured.platform()["network"] == ("off",)  # ... which configuration overrides
    offline = build_command(
        [
            "sh",
            "-c",
            f"pwd; tr a-z A-Z < in.txt > out.txt; {' '.join(connect_script(listener)[:2])} "
            f'"{connect_script(listener)[2]}" || echo no network',
        ],
        output_paths=["out.txt"],
    )
    online = build_command(connect_script(listener), platform={"network": "on"})
    async with running_agent(agent):
        first = await client.submit([], files={"in.txt": b"sandboxed\n"}, command=offline)
        second = await client.submit([], command=online)
        offline_response = await client.response(first)
        online_response = await client.response(second)

    assert offline_response.status.code == code_pb2.OK, offline_response.status.message
    assert await client.read(offline_response.result.stdout_digest) == b"/work\nno network\n"
    (output,) = offline_response.result.output_files
    assert await client.read(output.digest) == b"SANDBOXED\n"
    assert online_response.status.code == code_pb2.OK
    assert online_response.result.exit_code == 0
    assert await client.read(online_response.result.stdout_digest) == b"connected\n"
    assert list(work_dir.iterdir()) == []
    assert os.listdir(work_dir) == []
