"""Input roots built to hurt the worker get a precise refusal, and nothing is written.

- a symlink chain whose text stays inside the tree but whose resolution leaves it
  (`g/l -> ..`, `g/x -> l/../..`): the worker, as root, would otherwise create output
  directories, or read outputs, through it;
- a Directory message larger than the worker's bound: refused before it is fetched.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from google.rpc import code_pb2

from expbuild.config import BackendSettings
from expbuild.digest import Digest
from expbuild.worker.agent import WorkerAgent
from tests.test_worker_agent import (  # noqa: F401 (client, server: fixtures)
    client,
    running_agent,
    server,
    settings_for,
)


def agent_for(client, tmp_path, *, cache: bool = True, **backend) -> WorkerAgent:  # noqa: F811
    settings = settings_for(client.app.port, tmp_path / "work")
    settings = replace(settings, backend=replace(settings.backend, **backend))
    if not cache:
        settings = replace(settings, cache=replace(settings.cache, max_size=0))
    return WorkerAgent(settings)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
async def test_a_symlink_resolving_outside_the_input_root_is_refused(
    client,  # noqa: F811
    tmp_path,
    cache,
):
    agent = agent_for(client, tmp_path, cache=cache)
    async with running_agent(agent):
        # Never run: the action would start with a way out of its input root.
        submitted = await client.submit(
            ["sh", "-c", "echo ran"],
            files={"g/keep": b"x"},
            symlinks={"g/l": "..", "g/x": "l/../.."},
        )
        response = await client.response(submitted)
        # Each link alone is lexically fine; the worker still runs ordinary symlinks.
        inside = await client.submit(
            ["sh", "-c", "cat g/y/g/keep"], files={"g/keep": b"x"}, symlinks={"g/y": ".."}
        )
        inside_response = await client.response(inside)
    assert response.status.code == code_pb2.INVALID_ARGUMENT, response.status
    assert response.status.message == (
        "input symlink 'g/x' -> 'l/../..' resolves outside the input root"
    )
    assert not response.HasField("result")
    assert inside_response.status.code == code_pb2.OK, inside_response.status
    assert await client.read(inside_response.result.stdout_digest) == b"x"


@pytest.mark.parametrize("nested", [False, True], ids=["root", "subdirectory"])
async def test_an_oversized_directory_message_is_refused_by_digest(
    client,  # noqa: F811
    tmp_path,
    nested,
):
    agent = agent_for(client, tmp_path, max_directory_size=2048)
    prefix = "big/" if nested else ""
    # About 40 entries of ~70 bytes each: over 2 KiB in one Directory message.
    files = {f"{prefix}file-{n:03d}-{'x' * 20}": b"%d" % n for n in range(40)}
    async with running_agent(agent):
        submitted = await client.submit(["true"], files=files)
        response = await client.response(submitted)
        small = await client.submit(["sh", "-c", "echo fine"], files={"a": b"a"})
        small_response = await client.response(small)
    assert response.status.code == code_pb2.INVALID_ARGUMENT, response.status
    message = response.status.message
    assert message.startswith("Directory ") and "of the input root is" in message
    digest = Digest.parse(message.split()[1])
    assert digest.size_bytes > 2048
    assert message.endswith("over this worker's 2KiB limit ([worker.backend] max_directory_size)")
    assert small_response.status.code == code_pb2.OK  # the worker keeps serving


def test_the_bound_is_configurable():
    from expbuild.config import settings_from_mapping

    worker = settings_from_mapping({"worker": {"backend": {"max_directory_size": "1MiB"}}}).worker
    assert worker.backend.max_directory_size == 1024**2
    assert BackendSettings().max_directory_size == 16 * 1024**2
