"""An action cannot change what a later action sees, on every backend.

The attack: an input file is a hardlink to the worker's blob cache entry, so an action
that makes it writable and rewrites it (restoring its mode and mtime afterwards) would
hand its payload to every later action using that input. A root worker runs actions
as an unprivileged user (`[worker.backend] run_as`, "nobody" by default), who cannot
make the root-owned entry writable; with `run_as = "root"` inputs are copied, not
linked. Either way the next action reads the original bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from google.rpc import code_pb2

from expbuild.client.actions import build_command
from expbuild.config import BackendSettings, ConfigError
from expbuild.worker.action_user import ActionUser, check_reachable, resolve_action_user
from expbuild.worker.agent import WorkerAgent
from tests.test_worker_agent import (  # noqa: F401 (client, server: fixtures)
    client,
    running_agent,
    server,
    settings_for,
)
from tests.test_worker_docker import IMAGE, docker  # noqa: F401 (fixture)

ORIGINAL = b"#!/bin/sh\necho original tool\n"
PAYLOAD = b"#!/bin/sh\necho trojan!! tool\n"  # the same size: a stat cannot tell
# The exact sequence from the report (issue #8), then proof of who ran it.
assert len(PAYLOAD) == len(ORIGINAL)
ATTACK = (
    "chmod u+w tool; cat payload > tool; chmod 555 tool; touch -m -d @946684800 tool; id -u; true"
)
NOBODY = 65534


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """Outside pytest's tmp tree, which is root's alone: the action user must enter it."""
    top = Path(tempfile.mkdtemp(prefix="expbuild-run-as-"))
    top.chmod(0o755)
    try:
        yield top / "work"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("only a root worker runs actions as another user")


async def attack_then_read(client, agent: WorkerAgent, platform: dict[str, str]):  # noqa: F811
    files = {"tool": ORIGINAL, "payload": PAYLOAD}
    attack = build_command(["sh", "-c", ATTACK], platform=platform)
    read = build_command(["sh", "-c", "cat tool"], platform=platform)
    async with running_agent(agent):
        first = await client.response(
            await client.submit([], files=files, executables=("tool",), command=attack)
        )
        second = await client.response(
            await client.submit([], files=files, executables=("tool",), command=read)
        )
    assert first.status.code == code_pb2.OK, first.status.message
    assert second.status.code == code_pb2.OK, second.status.message
    attacker = (await client.read(first.result.stdout_digest)).decode()
    seen = await client.read(second.result.stdout_digest)
    return attacker, seen


BACKENDS = ["host", "sandbox", "docker"]


def backend_platform(backend: str, request) -> dict[str, str]:
    if backend == "docker":
        request.getfixturevalue("docker")
        return {"container-image": IMAGE}
    return {}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_action_cannot_rewrite_a_cached_input(
    backend,
    request,
    client,  # noqa: F811
    work_dir,
):
    needs_root()
    platform = backend_platform(backend, request)
    settings = settings_for(client.app.port, work_dir)
    settings = replace(settings, backend=BackendSettings(type=backend, work_dir=str(work_dir)))
    agent = WorkerAgent(settings)
    attacker, seen = await attack_then_read(client, agent, platform)
    assert attacker.split() == [str(NOBODY)]  # the default run_as
    assert seen == ORIGINAL
    # The cache entry itself is intact, still root's and read-only.
    (entry,) = settings.cache_dir.rglob(f"{hashlib.sha256(ORIGINAL).hexdigest()}.x")
    assert entry.read_bytes() == ORIGINAL
    assert entry.stat().st_uid == 0 and entry.stat().st_mode & 0o777 == 0o555


@pytest.mark.parametrize("backend", BACKENDS)
async def test_actions_kept_root_get_copies_of_cached_inputs(
    backend,
    request,
    client,  # noqa: F811
    work_dir,
):
    needs_root()
    platform = backend_platform(backend, request)
    settings = settings_for(client.app.port, work_dir)
    settings = replace(
        settings, backend=BackendSettings(type=backend, work_dir=str(work_dir), run_as="root")
    )
    agent = WorkerAgent(settings)
    attacker, seen = await attack_then_read(client, agent, platform)
    assert attacker.split() == ["0"]  # it ran as root, and its rewrite succeeded ...
    assert seen == ORIGINAL  # ... on its own copy only


def test_run_as_values():
    assert resolve_action_user("nobody", euid=0) == ActionUser(NOBODY, NOBODY)
    assert resolve_action_user("1234:99", euid=0) == ActionUser(1234, 99)
    assert resolve_action_user("root", euid=0) is None
    assert resolve_action_user("", euid=0) is None
    assert resolve_action_user("nobody", euid=1000) is None  # cannot switch: runs as itself
    with pytest.raises(ConfigError, match="no such user"):
        resolve_action_user("no-such-user-here", euid=0)
    with pytest.raises(ConfigError, match="is root"):
        resolve_action_user("0:0", euid=0)


def test_a_work_dir_the_action_user_cannot_enter_stops_start_up(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="cannot enter"):
        check_reachable(private / "work", ActionUser(NOBODY, NOBODY))
