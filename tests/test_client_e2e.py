"""The client library and the `run` / `execute` commands against a real server and worker.

A server replica (real gRPC, real Postgres, file CAS) runs in the test's event loop; a
WorkerAgent with the host backend runs beside it. CLI commands are invoked through click's
CliRunner in a thread, since they start their own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.rpc import code_pb2

from expbuild.cli.client_commands import (
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    execute,
    run,
)
from expbuild.client.actions import build_action, build_command
from expbuild.client.cas import CasClient
from expbuild.client.channel import open_channel
from expbuild.client.execution import ExecutionClient
from expbuild.client.run import _download_outputs as download_outputs
from expbuild.client.run import input_entries, run_command
from expbuild.client.tree import materialize, merkle_tree_from_paths
from expbuild.config import BackendSettings, WorkerSettings
from expbuild.digest import EMPTY, digest_of
from expbuild.errors import FailedPrecondition, InvalidArgument, NotFound, RemoteError
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.merkle import serialize
from expbuild.server.app import ServerApp
from expbuild.worker.agent import WorkerAgent
from tests.serving import running_server, running_worker, server_settings
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture
async def server(database_url, tmp_path):
    async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
        yield app


@pytest.fixture
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
async def cas(target) -> AsyncIterator[CasClient]:
    async with open_channel(target) as channel:
        yield CasClient(channel)


@pytest.fixture
async def worker(server, tmp_path) -> AsyncIterator[WorkerAgent]:
    async with running_worker(server, tmp_path / "work", name="worker-e2e", slots=2) as agent:
        yield agent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def big(size: int, seed: int = 0) -> bytes:
    pattern = bytes((i * 7 + seed) % 251 for i in range(4096))
    return (pattern * (size // len(pattern) + 1))[:size]


async def invoke(command, args: list[str], cwd: Path | None = None):
    """Run a click command in a thread (it calls asyncio.run itself)."""

    def call():
        runner = CliRunner()
        with contextlib.chdir(cwd) if cwd else contextlib.nullcontext():
            return runner.invoke(command, args, catch_exceptions=False)

    return await asyncio.to_thread(call)


# -- CAS ----------------------------------------------------------------------------------


async def test_upload_and_read_small_and_large_blobs(cas: CasClient, tmp_path: Path):
    small = b"small blob"
    large = big(5 * MiB + 3)  # over the 4 MiB batch limit: ByteStream both ways
    large_file = write(tmp_path / "large.bin", big(6 * MiB, seed=1))
    blobs = {digest_of(small): small, digest_of(large): large}
    blobs[digest_of(large_file.read_bytes())] = large_file

    assert set(await cas.find_missing(blobs)) == set(blobs)
    sent = await cas.upload(blobs)
    assert sent == sum(d.size_bytes for d in blobs)
    assert await cas.find_missing([*blobs, EMPTY]) == []
    assert await cas.upload(blobs) == 0

    assert await cas.read(digest_of(small)) == small
    assert await cas.read(digest_of(large)) == large
    assert await cas.read(EMPTY) == b""
    everything = await cas.read_many([*blobs, EMPTY, digest_of(small)])
    assert everything[digest_of(large)] == large
    assert everything[EMPTY] == b""

    out = tmp_path / "dl" / "sub" / "large.out"
    await cas.read_to_file(digest_of(large), out, executable=True)
    assert out.read_bytes() == large
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    await cas.read_to_file(digest_of(small), out)
    assert out.read_bytes() == small
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(p.name for p in out.parent.iterdir()) == ["large.out"]


async def test_many_small_blobs_split_into_several_batches(target: str):
    async with open_channel(target) as channel:
        cas = CasClient(channel, max_batch_bytes=16 * 1024)
        blobs = {digest_of(b): b for b in (big(3000, seed=i) for i in range(40))}
        blobs[digest_of(big(40_000))] = big(40_000)  # ByteStream under this small limit
        await cas.upload(blobs)
        assert await cas.find_missing(blobs) == []
        assert await cas.read_many(blobs) == blobs


async def test_reading_an_absent_blob_names_it(cas: CasClient):
    absent = digest_of(b"never uploaded")
    with pytest.raises(NotFound, match=absent.hash):
        await cas.read(absent)
    absent_large = digest_of(big(5 * MiB, seed=9))
    with pytest.raises(NotFound, match=absent_large.hash):
        await cas.read(absent_large)


async def test_file_changed_after_hashing_is_refused(cas: CasClient, tmp_path: Path):
    path = write(tmp_path / "f", b"original")
    tree = merkle_tree_from_paths({"f": path})
    path.write_bytes(b"changed!!")
    with pytest.raises(InvalidArgument, match=str(path)):
        await cas.upload(tree.blobs)


async def test_unreachable_server_says_where_and_what_to_check():
    target = f"127.0.0.1:{free_port()}"
    async with open_channel(target) as channel:
        with pytest.raises(RemoteError) as raised:
            await CasClient(channel).find_missing([digest_of(b"x")])
    assert raised.value.code == code_pb2.UNAVAILABLE
    assert target in str(raised.value) and "--server" in str(raised.value)


# -- trees --------------------------------------------------------------------------------


async def test_materialize_round_trip(cas: CasClient, tmp_path: Path):
    src = tmp_path / "src"
    write(src / "a.txt", b"a\n")
    write(src / "copy.txt", b"a\n", 0o755)  # same content, other mode
    write(src / "tool.sh", b"#!/bin/sh\n", 0o755)
    write(src / "deep" / "er" / "big.bin", big(5 * MiB))
    write(src / "deep" / "same.bin", big(5 * MiB))
    (src / "empty").mkdir()
    os.symlink("deep/er/big.bin", src / "link")
    tree = merkle_tree_from_paths({"src": src, "single.txt": write(tmp_path / "s", b"s")})
    await cas.upload(tree.blobs)

    out = tmp_path / "out"
    await materialize(cas, tree.root_digest, out)
    assert (out / "single.txt").read_bytes() == b"s"
    got = out / "src"
    assert (got / "a.txt").read_bytes() == b"a\n"
    assert stat.S_IMODE((got / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((got / "copy.txt").stat().st_mode) == 0o755
    assert stat.S_IMODE((got / "tool.sh").stat().st_mode) == 0o755
    assert (got / "deep" / "er" / "big.bin").read_bytes() == big(5 * MiB)
    assert (got / "deep" / "same.bin").read_bytes() == big(5 * MiB)
    assert (got / "empty").is_dir() and not any((got / "empty").iterdir())
    assert os.readlink(got / "link") == "deep/er/big.bin"
    # The same tree built from the copy has the same digest.
    assert (
        merkle_tree_from_paths({"src": got, "single.txt": out / "single.txt"}).root_digest
        == tree.root_digest
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="s", target="/etc/passwd")]),
            "absolute",
        ),
        (re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="s", target="../../x")]), "outside"),
        (re_pb2.Directory(files=[re_pb2.FileNode(name="..", digest=EMPTY.to_proto())]), "'..'"),
    ],
)
async def test_materialize_refuses_unsafe_trees(cas: CasClient, tmp_path: Path, bad, message):
    inner = serialize(bad)
    root = re_pb2.Directory(
        directories=[re_pb2.DirectoryNode(name="sub", digest=digest_of(inner).to_proto())]
    )
    root_bytes = serialize(root)
    await cas.upload({digest_of(inner): inner, digest_of(root_bytes): root_bytes})
    with pytest.raises(InvalidArgument, match=message):
        await materialize(cas, digest_of(root_bytes), tmp_path / "out")
    assert not (tmp_path / "x").exists()


# -- execution ----------------------------------------------------------------------------


async def test_run_command_with_inputs_and_outputs(target: str, worker, tmp_path: Path):
    src = tmp_path / "project" / "src"
    write(src / "one.txt", b"1\n2\n")
    write(src / "two.txt", b"3\n")
    script = write(tmp_path / "project" / "count.sh", b"#!/bin/sh\ncat src/*.txt | wc -l\n", 0o755)
    script_text = (
        "./count.sh > count.txt && mkdir -p out/sub && echo x > out/sub/x && "
        "cp count.sh out/ && ln -s ../count.txt out/link && echo done && echo warn >&2 && exit 3"
    )
    argv = ["sh", "-c", script_text]
    stages: list[str] = []
    download = tmp_path / "download"
    result = await run_command(
        target,
        argv,
        inputs=[src, script],
        outputs=["count.txt", "out"],
        download_to=download,
        progress=stages.append,
    )
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"done\n", b"warn\n")
    assert not result.cached
    assert result.worker
    assert (download / "count.txt").read_text().strip() == "3"
    assert (download / "out" / "sub" / "x").read_bytes() == b"x\n"
    assert os.access(download / "out" / "count.sh", os.X_OK)
    assert os.readlink(download / "out" / "link") == "../count.txt"
    assert sorted(result.outputs) == [download / "count.txt", download / "out"]
    assert any(line.startswith("Uploading") for line in stages)
    assert "Downloaded count.txt" in stages

    # Exit code 3 is not cached by REAPI servers; exit 0 is.
    ok = await run_command(target, ["echo", "hi"], download_to=download)
    again = await run_command(target, ["echo", "hi"], download_to=download)
    assert (ok.stdout, ok.cached, again.stdout, again.cached) == (b"hi\n", False, b"hi\n", True)
    fresh = await run_command(target, ["echo", "hi"], skip_cache_lookup=True, download_to=download)
    assert not fresh.cached


async def test_timeout_raises_with_the_partial_result(target: str, worker, tmp_path: Path):
    with pytest.raises(RemoteError) as raised:
        await run_command(
            target,
            ["sh", "-c", "echo started; sleep 30"],
            timeout=timedelta(seconds=1),
            download_to=tmp_path,
        )
    assert raised.value.code == code_pb2.DEADLINE_EXCEEDED
    assert raised.value.result.stdout == b"started\n"


async def test_execute_reports_missing_inputs(target: str, server, cas: CasClient):
    command = build_command(["true"])
    command_bytes = serialize(command)
    absent_root = digest_of(b"an input root nobody uploaded")
    action = build_action(digest_of(command_bytes), absent_root)
    action_bytes = serialize(action)
    await cas.upload(
        {digest_of(command_bytes): command_bytes, digest_of(action_bytes): action_bytes}
    )
    async with open_channel(target) as channel:
        with pytest.raises(FailedPrecondition) as raised:
            await ExecutionClient(channel).execute(digest_of(action_bytes))
    assert absent_root.hash in " ".join(v.subject for v in raised.value.violations)


async def test_inlined_output_that_does_not_match_its_digest_is_data_loss(
    cas: CasClient, tmp_path: Path
):
    # This server refuses such a result (UpdateActionResult checks inlined bytes); another
    # server's result may still carry one, and the client must not write the forged bytes.
    real = b"the output as built"
    await cas.upload({digest_of(real): real})
    result = re_pb2.ActionResult(exit_code=0)
    result.output_files.add(path="out.txt", digest=digest_of(real).to_proto(), contents=b"forged")
    with pytest.raises(RemoteError) as raised:
        await download_outputs(cas, result, tmp_path / "out", None)
    assert raised.value.code == code_pb2.DATA_LOSS, raised.value
    assert "out.txt" in str(raised.value)
    assert not (tmp_path / "out" / "out.txt").exists()


async def test_an_output_tree_that_is_no_tree_message_is_named(cas: CasClient, tmp_path: Path):
    # Another server's result may name any blob as a Tree; the user gets one line, not a
    # DecodeError traceback.
    blob = b"not a tree"
    await cas.upload({digest_of(blob): blob})
    result = re_pb2.ActionResult()
    result.output_directories.add(path="out", tree_digest=digest_of(blob).to_proto())
    with pytest.raises(InvalidArgument, match="output directory out: .* is not a Tree message"):
        await download_outputs(cas, result, tmp_path, None)


def test_inputs_are_named_as_the_cli_checks_them(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    # `a/..` is the directory itself, named as such (not '..'); a symlink keeps its name.
    assert list(input_entries([tmp_path / "a" / "..", tmp_path / "link"])) == [
        tmp_path.name,
        "link",
    ]
    with pytest.raises(InvalidArgument, match="would both be placed at 'link'"):
        input_entries([tmp_path / "link", tmp_path / "a" / ".." / "link"])
    with pytest.raises(InvalidArgument, match="no name"):
        input_entries([Path("/")])


# -- CLI ----------------------------------------------------------------------------------


async def test_cli_run_passes_output_and_exit_code_through(target: str, worker, tmp_path: Path):
    result = await invoke(
        run,
        ["--server", f"http://{target}", "--", "sh", "-c", "echo out; echo err >&2; exit 7"],
        tmp_path,
    )
    assert result.exit_code == 7
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


async def test_cli_run_json(target: str, worker, tmp_path: Path):
    write(tmp_path / "in.txt", b"data")
    result = await invoke(
        run,
        [
            "--server",
            target,
            "--json",
            "--input",
            "in.txt",
            "--output",
            "copy.txt",
            "--env",
            "GREETING=hi",
            "--",
            "sh",
            "-c",
            "cp in.txt copy.txt; echo $GREETING",
        ],
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["exit_code"] == 0 and report["stdout"] == "hi\n" and report["cached"] is False
    assert report["timed_out"] is False
    assert report["worker"] and "/" in report["action_digest"]
    assert report["outputs"] == [str(Path("copy.txt"))]
    assert (tmp_path / "copy.txt").read_bytes() == b"data"


async def test_cli_run_timeout_exit_code(target: str, worker, tmp_path: Path):
    result = await invoke(
        run,
        ["--server", target, "--timeout", "1", "--", "sh", "-c", "echo so far; sleep 30"],
        tmp_path,
    )
    assert result.exit_code == EXIT_TIMEOUT
    assert result.stdout == "so far\n"
    assert "expbuild: error: the action timed out" in result.stderr


async def test_cli_execute_uploaded_action(target: str, worker, cas: CasClient):
    command_bytes = serialize(build_command(["echo", "from execute"]))
    action_bytes = serialize(build_action(digest_of(command_bytes), EMPTY))
    await cas.upload(
        {digest_of(command_bytes): command_bytes, digest_of(action_bytes): action_bytes}
    )
    result = await invoke(execute, ["--server", target, str(digest_of(action_bytes))])
    assert (result.exit_code, result.stdout) == (0, "from execute\n")


def test_cli_unreachable_server():
    result = CliRunner().invoke(run, ["--server", f"127.0.0.1:{free_port()}", "--", "true"])
    assert result.exit_code == EXIT_UNAVAILABLE
    assert result.stderr.startswith("expbuild: error: the server at 127.0.0.1:")
    assert "--server" in result.stderr


def test_cli_usage_errors(tmp_path: Path):
    missing = CliRunner().invoke(run, ["--input", str(tmp_path / "nope"), "--", "true"])
    assert missing.exit_code == EXIT_USAGE
    assert "expbuild: error: input" in missing.stderr and "nope" in missing.stderr
    bad_pair = CliRunner().invoke(run, ["--platform", "novalue", "--", "true"])
    assert bad_pair.exit_code == EXIT_USAGE and "'novalue'" in bad_pair.stderr
    bad_output = CliRunner().invoke(run, ["--output", "../x", "--", "true"])
    assert bad_output.exit_code == EXIT_USAGE and "'../x'" in bad_output.stderr
    bad_digest = CliRunner().invoke(execute, ["abc/12"])
    assert bad_digest.exit_code == EXIT_USAGE and "HASH/SIZE" in bad_digest.stderr
    bad_server = CliRunner().invoke(run, ["--server", "nonsense", "--", "true"])
    assert bad_server.exit_code == EXIT_USAGE


async def test_wait_attaches_to_a_running_operation(target: str, worker, cas: CasClient):
    command_bytes = serialize(build_command(["sh", "-c", "sleep 1; echo waited"]))
    action_bytes = serialize(build_action(digest_of(command_bytes), EMPTY, do_not_cache=True))
    await cas.upload(
        {digest_of(command_bytes): command_bytes, digest_of(action_bytes): action_bytes}
    )
    async with open_channel(target) as channel:
        execution = ExecutionClient(channel)
        stream = execution.stream(digest_of(action_bytes))
        first = await anext(stream)
        await stream.aclose()  # the client goes away; the operation keeps running
        stages: list[int] = []
        response = await execution.wait(first.name, on_stage=stages.append)
        assert response.result.exit_code == 0
        assert await cas.read(digest_of(b"waited\n")) == b"waited\n"
        assert stages[-1] == re_pb2.ExecutionStage.COMPLETED


async def test_cli_verbose_progress_and_json_errors(target: str, worker, tmp_path: Path):
    result = await invoke(
        run, ["--server", target, "-v", "--no-cache", "--", "echo", "hi"], tmp_path
    )
    assert result.exit_code == 0 and result.stdout == "hi\n"
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Uploading ") and "Completed" in lines
    # The worker is named while executing if the server says, else once the result is in.
    assert any(
        line.startswith(("Executing on worker-e2e", "Executed on worker-e2e")) for line in lines
    )

    failed = await invoke(
        run, ["--server", target, "--json", "--timeout", "1", "--", "sleep", "30"], tmp_path
    )
    # --help: "with --json: 0, the code is in the JSON" holds for a timeout too.
    assert failed.exit_code == 0 and failed.stderr == ""
    report = json.loads(failed.stdout)
    assert "timed out" in report["error"] and report["exit_code"] != 0
    assert report["timed_out"] is True
    assert "--json: 0" in (await invoke(run, ["--help"], tmp_path)).stdout


async def test_execute_survives_a_server_restart(database_url, tmp_path: Path, caplog):
    """The Execute stream breaks when the server goes away; the client reattaches to the
    same operation with WaitExecution once a server is back on that address."""
    caplog.set_level(logging.INFO, logger="expbuild.client")
    settings = server_settings(tmp_path / "cas")
    first = ServerApp(settings, database_url)
    await first.start()
    port = first.port
    target = f"127.0.0.1:{port}"
    worker_settings = WorkerSettings(
        server_url=f"http://{target}",
        name="worker-restart",
        poll_timeout=timedelta(seconds=1),
        backend=BackendSettings(type="host", work_dir=str(tmp_path / "work"), run_as="root"),
    )
    agent = WorkerAgent(worker_settings, shutdown_grace=2)
    agent_job = asyncio.create_task(agent.run())
    second: ServerApp | None = None
    try:
        async with open_channel(target) as channel:
            cas = CasClient(channel)
            command_bytes = serialize(build_command(["sh", "-c", "sleep 2; echo survived"]))
            action_bytes = serialize(
                build_action(digest_of(command_bytes), EMPTY, do_not_cache=True)
            )
            await cas.upload(
                {digest_of(command_bytes): command_bytes, digest_of(action_bytes): action_bytes}
            )
            stages: list[int] = []
            running = asyncio.create_task(
                ExecutionClient(channel).execute(digest_of(action_bytes), on_stage=stages.append)
            )
            await wait_until(lambda: stages, what="the first stage")
            await first.stop(grace=0)
            second = ServerApp(settings, database_url, port=port)
            await second.start()
            response = await asyncio.wait_for(running, 60)
        assert response.result.exit_code == 0
        assert "Reattaching to operation" in caplog.text
        async with open_channel(target) as channel:
            stdout = await CasClient(channel).read(digest_of(b"survived\n"))
        assert stdout == b"survived\n"
    finally:
        agent.request_stop()
        await asyncio.wait_for(agent_job, 30)
        if second is not None:
            await second.stop(grace=0.5)
