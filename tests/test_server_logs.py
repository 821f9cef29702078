"""ExecuteResponse.server_logs["worker.log"]: the worker's log of one action, as a CAS blob.

Real server, real Postgres, a real WorkerAgent (host backend): the log names how the
action was launched (argv, backend, user, limits), its inputs (worker cache hits and
fetches), the exit code and status, with timings; it holds only that action's lines when
actions run side by side; and it is attached when the action fails before its outputs.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import timedelta

import pytest
from google.rpc import code_pb2

from expbuild.client.actions import build_action, build_command
from expbuild.client.cas import CasClient
from expbuild.client.execution import ExecutionClient
from expbuild.client.tree import serialize
from expbuild.digest import Digest, digest_of
from expbuild.proto import remote_execution_pb2 as re_pb2
from tests.serving import running_server, running_worker, server_settings

pytestmark = pytest.mark.e2e


@pytest.fixture
async def server(database_url, tmp_path):
    async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
        yield app


async def upload(channel, argv, files: dict[str, bytes] | None = None, timeout=None) -> Digest:
    root = re_pb2.Directory(
        files=[
            re_pb2.FileNode(name=name, digest=digest_of(data).to_proto())
            for name, data in sorted((files or {}).items())
        ]
    )
    command = build_command(argv, output_paths=["out.txt"])
    action = build_action(
        digest_of(serialize(command)),
        digest_of(serialize(root)),
        timeout=timeout,
        do_not_cache=True,
    )
    blobs = {digest_of(data): data for data in (files or {}).values()}
    blobs.update({digest_of(serialize(m)): serialize(m) for m in (command, root, action)})
    await CasClient(channel).upload(blobs)
    return digest_of(serialize(action))


async def worker_log(channel, response: re_pb2.ExecuteResponse) -> str:
    assert "worker.log" in response.server_logs, response
    entry = response.server_logs["worker.log"]
    assert entry.human_readable
    return (await CasClient(channel).read(Digest.from_proto(entry.digest))).decode()


async def test_worker_log_tells_launch_inputs_exit_and_status(server, channel, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="expbuild")
    digest = await upload(
        channel, ["sh", "-c", "cat in.txt > out.txt"], files={"in.txt": b"input\n"}
    )
    async with running_worker(server, tmp_path / "work"):
        first = await ExecutionClient(channel).execute(digest)
        second = await ExecutionClient(channel).execute(digest, skip_cache_lookup=True)
    assert first.status.code == code_pb2.OK, first.status
    text = await worker_log(channel, first)
    assert "launch: " in text and '"cat in.txt > out.txt"' in text
    assert "with HostExecutor as the worker user" in text
    assert "limits: timeout=" in text
    fetched = re.search(
        r"inputs ready in [\d.]+s: 0 blob\(s\) from the worker cache, (\d+) fetched", text
    )
    assert fetched and int(fetched.group(1)) >= 1, text
    assert "exit code 0;" in text and "status: OK" in text
    # Records the worker logs during the action are in it too, with their timings.
    assert "Executing command:" in text
    assert all(line.startswith("+") for line in text.splitlines())
    # The second run finds its input in the worker's blob cache.
    again = await worker_log(channel, second)
    hits = re.search(
        r"inputs ready in [\d.]+s: (\d+) blob\(s\) from the worker cache, 0 fetched", again
    )
    assert hits and int(hits.group(1)) >= 1, again


async def test_worker_log_of_a_timed_out_action_says_so(server, channel, tmp_path):
    digest = await upload(channel, ["sh", "-c", "sleep 30"], timeout=timedelta(seconds=1))
    async with running_worker(server, tmp_path / "work"):
        response = await ExecutionClient(channel).execute(digest)
    assert response.status.code == code_pb2.DEADLINE_EXCEEDED
    text = await worker_log(channel, response)
    assert "limits: timeout=1s" in text
    assert "status: DEADLINE_EXCEEDED: action timed out after 1s" in text


async def test_worker_log_is_attached_when_inputs_fail(server, channel, tmp_path):
    """An input file left the CAS after Execute accepted the action: the worker fails the
    task before running it, and the log still says why."""
    digest = await upload(channel, ["cat", "in.txt"], files={"in.txt": b"vanishing\n"})
    server.store.path_of(digest_of(b"vanishing\n")).unlink()
    async with running_worker(server, tmp_path / "work"):
        response = await ExecutionClient(channel).execute(digest)
    assert response.status.code == code_pb2.FAILED_PRECONDITION
    text = await worker_log(channel, response)
    assert "status: FAILED_PRECONDITION" in text and "launch:" not in text


async def test_concurrent_actions_each_get_only_their_own_lines(server, channel, tmp_path):
    digests = [
        await upload(channel, ["sh", "-c", f"echo action-{i} > out.txt; sleep 0.3"])
        for i in range(4)
    ]
    async with running_worker(server, tmp_path / "work", slots=4):
        responses = await asyncio.gather(*(ExecutionClient(channel).execute(d) for d in digests))
    for i, response in enumerate(responses):
        text = await worker_log(channel, response)
        assert f"action-{i}" in text
        assert not any(f"action-{j}" in text for j in range(4) if j != i), text
