"""WorkerAgent against the real server: PostgreSQL queue, file CAS, real gRPC, real processes.

Work is submitted with the client library (upload, Execute) and the agent picks it up
through the Worker API like any deployed worker. Server-side facts (leases, events,
workers) are read from Postgres; the few server-side decisions a test needs to provoke
(cancel a task, expire a lease, forget a worker) are made by writing the rows the server
itself reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2

from expbuild.client.actions import build_action, build_command
from expbuild.client.cas import CasClient
from expbuild.client.channel import open_channel
from expbuild.client.execution import ExecutionClient
from expbuild.client.tree import MerkleTree, merkle_tree_from_directory
from expbuild.config import BackendSettings, Settings, WorkerSettings
from expbuild.db import operations as db_operations
from expbuild.digest import Digest, digest_of
from expbuild.errors import InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import worker_pb2, worker_pb2_grpc
from expbuild.reapi.merkle import serialize
from expbuild.reapi.platforms import platform_message
from expbuild.reapi.status import parse_blob_subject
from expbuild.server.app import ServerApp
from expbuild.worker.agent import WorkerAgent
from tests.serving import running_server, server_settings
from tests.survivors import is_gone
from tests.waiting import wait_until

DEADLINE = 15.0


# -- the server, the client, the agent ---------------------------------------------------


@pytest.fixture
async def server(database_url, tmp_path) -> AsyncIterator[ServerApp]:
    async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
        yield app


@dataclass
class Submitted:
    action_digest: Digest
    # The Execute call, running until the operation is done: its final ExecuteResponse.
    response: asyncio.Task[re_pb2.ExecuteResponse]


@dataclass
class Client:
    """Submits actions the way `expbuild run` does and looks at what the server recorded."""

    app: ServerApp
    cas: CasClient
    execution: ExecutionClient
    inputs_dir: Path
    pending: list[asyncio.Task] = field(default_factory=list)

    async def submit(
        self,
        argv: list[str],
        *,
        files: dict[str, bytes] | None = None,
        executables: tuple[str, ...] = (),
        symlinks: dict[str, str] | None = None,
        output_paths: tuple[str, ...] = (),
        timeout: float | None = None,
        command: re_pb2.Command | None = None,
        withhold: Callable[[MerkleTree], set[Digest]] | None = None,
    ) -> Submitted:
        """Upload the action (inputs given as relative path -> bytes) and Execute it.

        `withhold` picks blobs of the input tree not to upload. Every action is
        do_not_cache, so identical commands in one test run again.
        """
        root = self.inputs_dir / f"inputs-{len(self.pending)}"
        root.mkdir(parents=True)
        for relative, data in (files or {}).items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(data)
            if relative in executables:
                (root / relative).chmod(0o755)
        for relative, target in (symlinks or {}).items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).symlink_to(target)
        tree = merkle_tree_from_directory(root)
        command = command or build_command(argv, output_paths=output_paths)
        command_bytes = command.SerializeToString(deterministic=True)
        action = build_action(
            digest_of(command_bytes),
            tree.root_digest,
            timeout=None if timeout is None else timedelta(seconds=timeout),
            do_not_cache=True,
        )
        action_bytes = serialize(action)
        withheld = withhold(tree) if withhold else set()
        blobs = {d: b for d, b in tree.blobs.items() if d not in withheld}
        blobs[digest_of(command_bytes)] = command_bytes
        blobs[digest_of(action_bytes)] = action_bytes
        await self.cas.upload(blobs)
        action_digest = digest_of(action_bytes)
        job = asyncio.create_task(self.execution.execute(action_digest))
        self.pending.append(job)
        return Submitted(action_digest, job)

    async def task_id(self, submitted: Submitted) -> int:
        """The queue's id of the submitted action's task (once Execute has queued it)."""
        found: list[int] = []

        async def queued() -> bool:
            found[:] = [
                row["id"]
                for row in await self.app.pool.fetch(
                    "SELECT id FROM tasks WHERE action_digest = $1", str(submitted.action_digest)
                )
            ]
            return bool(found)

        await wait_until(queued, what=f"the task of {submitted.action_digest}")
        (task_id,) = found
        return task_id

    async def response(self, submitted: Submitted) -> re_pb2.ExecuteResponse:
        return await asyncio.wait_for(asyncio.shield(submitted.response), DEADLINE)

    async def read(self, digest_proto: re_pb2.Digest) -> bytes:
        return await self.cas.read(Digest.from_proto(digest_proto))

    async def events(self, task_id: int) -> list[str]:
        rows = await self.app.pool.fetch(
            "SELECT event FROM task_events WHERE task_id = $1 ORDER BY id", task_id
        )
        return [row["event"] for row in rows]


@contextlib.asynccontextmanager
async def client_of(server: ServerApp, tmp_path: Path) -> AsyncIterator[Client]:
    async with open_channel(f"127.0.0.1:{server.port}") as channel:
        client = Client(server, CasClient(channel), ExecutionClient(channel), tmp_path / "client")
        try:
            yield client
        finally:
            # Executes of tasks a test left unfinished on purpose (cancelled, handed back).
            for job in client.pending:
                job.cancel()
            await asyncio.gather(*client.pending, return_exceptions=True)


@pytest.fixture
async def client(server: ServerApp, tmp_path: Path) -> AsyncIterator[Client]:
    async with client_of(server, tmp_path) as client:
        yield client


def settings_for(port: int, work_dir: Path, **overrides) -> WorkerSettings:
    settings = WorkerSettings(
        server_url=f"http://127.0.0.1:{port}",
        name="test-worker",
        max_concurrent_tasks=2,
        heartbeat_interval=timedelta(seconds=0.2),
        poll_timeout=timedelta(seconds=1),
        # pytest's tmp tree is private to root, out of reach of an unprivileged action user
        # (tests/test_worker_run_as.py runs actions as one).
        backend=BackendSettings(type="host", work_dir=str(work_dir), run_as="root"),
    )
    return replace(settings, **overrides)


@contextlib.asynccontextmanager
async def running_agent(agent: WorkerAgent) -> AsyncIterator[asyncio.Task]:
    job = asyncio.create_task(agent.run())
    try:
        yield job
    finally:
        agent.request_stop()
        await asyncio.wait_for(job, 20)


def pid_in(path: Path) -> Callable[[], bool]:
    return lambda: path.exists() and path.read_text().strip() != ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- running actions ---------------------------------------------------------------------


async def test_runs_a_task_end_to_end(server, client, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="expbuild.worker")
    work_dir = tmp_path / "work"
    agent = WorkerAgent(settings_for(server.port, work_dir), shutdown_grace=5)
    argv = ["sh", "-c", "tr a-z A-Z < src/in.txt > out/upper.txt; echo done; echo warn >&2"]
    async with running_agent(agent):
        submitted = await client.submit(
            argv, files={"src/in.txt": b"hello worker\n"}, output_paths=("out/upper.txt",)
        )
        response = await client.response(submitted)
        worker_id = agent.worker_id
    task_id = await client.task_id(submitted)

    assert response.status.code == code_pb2.OK
    assert not response.cached_result
    result = response.result
    assert result.exit_code == 0
    (output,) = result.output_files
    assert output.path == "out/upper.txt"
    assert await client.read(output.digest) == b"HELLO WORKER\n"
    assert await client.read(result.stdout_digest) == b"done\n"
    assert await client.read(result.stderr_digest) == b"warn\n"

    metadata = result.execution_metadata
    assert metadata.worker == "test-worker"
    queued_at = await server.pool.fetchval("SELECT queued_at FROM tasks WHERE id = $1", task_id)
    assert metadata.queued_timestamp.ToDatetime(tzinfo=UTC) == queued_at
    stamps = [
        metadata.worker_start_timestamp,
        metadata.input_fetch_start_timestamp,
        metadata.input_fetch_completed_timestamp,
        metadata.execution_start_timestamp,
        metadata.execution_completed_timestamp,
        metadata.output_upload_start_timestamp,
        metadata.output_upload_completed_timestamp,
        metadata.worker_completed_timestamp,
    ]
    times = [s.ToDatetime() for s in stamps]
    assert all(s.seconds > 0 for s in stamps)
    assert times == sorted(times)

    # Registered as configured, leased once, completed once, deregistered on stop.
    worker = await server.pool.fetchrow("SELECT * FROM workers WHERE id = $1", worker_id)
    assert worker["name"] == "test-worker"
    assert worker["max_concurrent"] == 2
    assert {"OSFamily", "Arch"} <= set(worker["platform"])
    assert worker["state"] == "offline"
    assert await client.events(task_id) == ["queued", "leased", "completed"]
    assert list(work_dir.iterdir()) == []  # the action directory is gone

    text = caplog.text
    action = re_pb2.Action()
    action.ParseFromString(await client.cas.read(submitted.action_digest))
    for line in (
        f"Worker {worker_id} registered successfully",
        f"Starting execution of task task-{task_id}",
        f"Downloading action {submitted.action_digest}",
        f"Downloading command {Digest.from_proto(action.command_digest)}",
        f"Downloading input root {Digest.from_proto(action.input_root_digest)}",
        'Executing command: ["sh", "-c", ',
        "Command exited with code: 0",
        f"Task task-{task_id} completed successfully",
        f"Worker {worker_id} deregistered",
    ):
        assert line in text, line


async def test_configured_platform_wins_over_detected(server, tmp_path):
    settings = settings_for(
        server.port, tmp_path / "work", platform={"OSFamily": ("Plan9",), "pool": ("b", "a")}
    )
    agent = WorkerAgent(settings)
    async with running_agent(agent):
        await wait_until(lambda: agent.worker_id, what="registration")
        platform = await server.pool.fetchval(
            "SELECT platform FROM workers WHERE id = $1", agent.worker_id
        )
    assert platform["OSFamily"] == ["Plan9"]
    assert sorted(platform["pool"]) == ["a", "b"]
    assert "Arch" in platform
    # What RegisterWorker sends: sorted by name, then value, as REAPI asks.
    properties = [(p.name, p.value) for p in platform_message(agent.platform()).properties]
    assert ("OSFamily", "Plan9") in properties
    assert properties == sorted(properties)


async def test_failing_command_and_timeout(server, client, tmp_path):
    async with running_agent(WorkerAgent(settings_for(server.port, tmp_path / "work"))):
        failing = await client.submit(["sh", "-c", "echo partial; exit 7"])
        slow = await client.submit(["sh", "-c", "echo before; sleep 30"], timeout=0.5)
        failed = await client.response(failing)
        timed_out = await client.response(slow)

    assert failed.status.code == code_pb2.OK
    assert failed.result.exit_code == 7
    assert await client.read(failed.result.stdout_digest) == b"partial\n"

    assert timed_out.status.code == code_pb2.DEADLINE_EXCEEDED
    assert timed_out.status.message == "action timed out after 0.5s"
    assert timed_out.HasField("result")
    assert await client.read(timed_out.result.stdout_digest) == b"before\n"


def violations(response: re_pb2.ExecuteResponse) -> list[tuple[str, str]]:
    found = []
    for detail in response.status.details:
        failure = error_details_pb2.PreconditionFailure()
        assert detail.Unpack(failure)
        found += [(v.type, v.subject) for v in failure.violations]
    return found


def subject(digest: Digest) -> str:
    return f"blobs/{digest.hash}/{digest.size_bytes}"  # spelled out: the wire format Bazel reads


async def test_missing_inputs_fail_with_precondition_failure(server, client, tmp_path):
    """Blobs of the input tree absent from the CAS: FAILED_PRECONDITION listing every one
    of them as MISSING (what makes Bazel upload them and retry), and the worker serves on."""
    work_dir = tmp_path / "work"
    big = bytes(range(256)) * (5 * 4096)  # 5 MiB: fetched by ByteStream, not in a batch
    absent_a, absent_b = digest_of(b"first missing\n"), digest_of(b"second missing\n")
    absent_big = digest_of(big)
    files = {
        "present.txt": b"here\n",
        "a.txt": b"first missing\n",
        "deep/b.txt": b"second missing\n",
        "deep/big.bin": big,
    }
    absent_dir_content = digest_of(b"in a missing directory\n")
    async with running_agent(WorkerAgent(settings_for(server.port, work_dir))):
        missing_files = await client.submit(
            ["cat", "a.txt"], files=files, withhold=lambda tree: {absent_a, absent_b, absent_big}
        )

        def directory_of(name: str) -> Callable[[MerkleTree], set[Digest]]:
            def pick(tree: MerkleTree) -> set[Digest]:
                root = re_pb2.Directory.FromString(tree.blobs[tree.root_digest])
                (node,) = [d for d in root.directories if d.name == name]
                return {Digest.from_proto(node.digest), absent_dir_content}

            return pick

        missing_directory = await client.submit(
            ["true"],
            files={"top.txt": b"top\n", "sub/x.txt": b"in a missing directory\n"},
            withhold=directory_of("sub"),
        )
        bad_path = re_pb2.Command(arguments=["true"], output_paths=["../escape"])
        invalid = await client.submit([], command=bad_path)
        fine = await client.submit(["sh", "-c", "echo still here"])

        missing_files_response = await client.response(missing_files)
        missing_directory_response = await client.response(missing_directory)
        # The server refuses an escaping output path at Execute, before it is queued.
        with pytest.raises(InvalidArgument, match="'../escape' is outside the input root"):
            await client.response(invalid)
        fine_response = await client.response(fine)

    response = missing_files_response
    assert response.status.code == code_pb2.FAILED_PRECONDITION
    assert not response.HasField("result")
    assert sorted(violations(response)) == sorted(
        ("MISSING", subject(d)) for d in (absent_a, absent_b, absent_big)
    )
    assert "3 blob(s) of the tree are not in the CAS" in response.status.message
    assert "'a.txt'" in response.status.message and "'deep/b.txt'" in response.status.message
    assert response.message == response.status.message

    # A missing Directory is reported (its files are never reached).
    response = missing_directory_response
    assert response.status.code == code_pb2.FAILED_PRECONDITION
    ((kind, missing_subject),) = violations(response)
    # The subject names a blob (the Directory), not the file inside it.
    assert kind == "MISSING" and parse_blob_subject(missing_subject) != absent_dir_content
    assert "directory 'sub'" in response.status.message

    assert fine_response.status.code == code_pb2.OK
    assert await client.read(fine_response.result.stdout_digest) == b"still here\n"
    assert list(work_dir.iterdir()) == []


async def test_unsupported_output_keeps_logs(server, client, tmp_path):
    async with running_agent(WorkerAgent(settings_for(server.port, tmp_path / "work"))):
        submitted = await client.submit(
            ["sh", "-c", "mkfifo pipe; echo made it"], output_paths=("pipe",)
        )
        response = await client.response(submitted)
    assert response.status.code == code_pb2.INVALID_ARGUMENT
    assert "FIFO" in response.status.message
    assert await client.read(response.result.stdout_digest) == b"made it\n"


async def test_unusable_work_dir_fails_the_task_with_a_message(server, client, tmp_path):
    not_a_directory = tmp_path / "work"
    not_a_directory.write_text("a file where the work dir should be")
    async with running_agent(WorkerAgent(settings_for(server.port, not_a_directory))):
        response = await client.response(await client.submit(["true"]))
    assert response.status.code == code_pb2.INTERNAL
    assert f"cannot create an action directory in {not_a_directory}" in response.status.message


# -- slots -------------------------------------------------------------------------------


async def test_never_runs_more_than_max_concurrent_tasks(server, client, tmp_path):
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work", max_concurrent_tasks=2))
    marker = tmp_path / "running"
    marker.mkdir()
    # Each action waits (up to 2 s) for a second one to run beside it, then prints how
    # many run at that moment (itself included).
    script = (
        f"touch {marker}/$$; i=0; "
        f'while [ "$(ls {marker} | wc -l)" -lt 2 ] && [ $i -lt 100 ]; do sleep 0.02; i=$((i+1)); done; '
        f"ls {marker} | wc -l; sleep 0.2; rm {marker}/$$"
    )
    leased_counts: list[int] = []
    async with running_agent(agent):
        submitted = [await client.submit(["sh", "-c", f"{script}; echo {i}"]) for i in range(4)]
        everything = asyncio.gather(*(client.response(s) for s in submitted))
        while not everything.done():
            leased_counts.append(
                await server.pool.fetchval("SELECT count(*) FROM tasks WHERE state = 'leased'")
            )
            await asyncio.sleep(0.02)
        responses = await everything

    assert all(r.status.code == code_pb2.OK for r in responses)
    seen = [int((await client.read(r.result.stdout_digest)).split()[0]) for r in responses]
    assert max(seen) == 2  # it does run them in parallel, never three at once
    assert max(leased_counts) <= 2

    # Replay the leases and completions: never more than two held at once.
    rows = await server.pool.fetch(
        "SELECT event FROM task_events WHERE event IN ('leased', 'completed') ORDER BY at, id"
    )
    held = peak = 0
    for row in rows:
        held += 1 if row["event"] == "leased" else -1
        peak = max(peak, held)
    assert peak == 2
    assert [row["event"] for row in rows].count("completed") == 4


# -- cancellation ------------------------------------------------------------------------


async def test_heartbeat_cancellation_kills_the_action_without_reporting(
    server, client, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="expbuild.worker")
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work"))
    pid_file = tmp_path / "pid"
    async with running_agent(agent):
        submitted = await client.submit(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"])
        task_id = await client.task_id(submitted)
        await wait_until(pid_in(pid_file), what="the action to start")
        pid = int(pid_file.read_text())
        # A client cancels the operation; the worker's next heartbeat is told so.
        operation = await server.pool.fetchval(
            "SELECT name FROM operations WHERE task_id = $1", task_id
        )
        await db_operations.cancel_operation(server.pool, operation)
        await wait_until(lambda: is_gone(pid), what="the action to be killed")
        await wait_until(lambda: not agent.running_task_ids, what="the task to end")
        after = await client.response(await client.submit(["sh", "-c", "echo next"]))
        assert after.status.code == code_pb2.OK
        # Neither completed nor handed back by the agent.
        assert await client.events(task_id) == ["queued", "leased", "cancelled"]
        assert (await client.response(submitted)).status.code == code_pb2.CANCELLED

    assert "completed" not in await client.events(task_id)
    assert f"Stopping task task-{task_id}: cancelled by the server" in caplog.text
    assert f"Task task-{task_id} stopped (cancelled by the server); not reporting it" in (
        caplog.text
    )
    assert list((tmp_path / "work").iterdir()) == []


# -- shutdown ----------------------------------------------------------------------------


async def test_shutdown_waits_for_running_tasks_within_grace(server, client, tmp_path):
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work"), shutdown_grace=10)
    job = asyncio.create_task(agent.run())
    submitted = await client.submit(["sh", "-c", "sleep 0.5; echo finished"])
    await wait_until(lambda: agent.running_task_ids, what="the task to start")
    worker_id = agent.worker_id
    agent.request_stop()
    await asyncio.wait_for(job, 20)

    response = await client.response(submitted)
    assert response.status.code == code_pb2.OK
    assert await client.read(response.result.stdout_digest) == b"finished\n"
    events = await client.events(await client.task_id(submitted))
    assert events == ["queued", "leased", "completed"]  # completed exactly once
    state = await server.pool.fetchval("SELECT state FROM workers WHERE id = $1", worker_id)
    assert state == "offline"


async def test_shutdown_hands_back_tasks_still_running_after_grace(
    server, client, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="expbuild.worker")
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work"), shutdown_grace=0.3)
    pid_file = tmp_path / "pid"
    job = asyncio.create_task(agent.run())
    submitted = await client.submit(["sh", "-c", f"echo $$ > {pid_file}; sleep 300"])
    task_id = await client.task_id(submitted)
    await wait_until(pid_in(pid_file), what="the action to start")
    pid = int(pid_file.read_text())
    worker_id = agent.worker_id
    agent.request_stop()
    await asyncio.wait_for(job, 20)  # the action alone would take 300 s
    assert is_gone(pid)

    task = await server.pool.fetchrow(
        "SELECT state, attempts, worker_id FROM tasks WHERE id = $1", task_id
    )
    assert (task["state"], task["attempts"], task["worker_id"]) == ("queued", 0, None)
    rows = await server.pool.fetch(
        "SELECT event, worker_id, detail FROM task_events WHERE task_id = $1 ORDER BY id",
        task_id,
    )
    assert [r["event"] for r in rows] == ["queued", "leased", "released"]
    assert rows[-1]["worker_id"] == worker_id
    assert rows[-1]["detail"]["reason"] == "worker shutting down"
    assert f"Task task-{task_id} handed back to the server (worker shutting down)" in caplog.text
    state = await server.pool.fetchval("SELECT state FROM workers WHERE id = $1", worker_id)
    assert state == "offline"
    assert list((tmp_path / "work").iterdir()) == []


def long_poll_settings(cas_root: Path) -> Settings:
    """A server that holds a PollTasks call for up to an hour when there is no work."""
    settings = server_settings(cas_root)
    return replace(settings, server=replace(settings.server, poll_timeout=timedelta(hours=1)))


async def test_stop_cancels_the_long_poll_at_once(database_url, tmp_path):
    async with running_server(long_poll_settings(tmp_path / "cas"), database_url) as app:
        agent = WorkerAgent(
            settings_for(app.port, tmp_path / "work", poll_timeout=timedelta(hours=1))
        )
        job = asyncio.create_task(agent.run())
        # The agent's long poll is in flight (the server would hold it for an hour).
        await wait_until(lambda: agent._poll_call is not None, what="a poll")
        agent.request_stop()
        await asyncio.wait_for(job, 20)  # only by cancelling the poll


async def test_stop_while_server_unreachable_returns(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="expbuild.worker")
    agent = WorkerAgent(settings_for(free_port(), tmp_path / "work"))
    job = asyncio.create_task(agent.run())
    await wait_until(lambda: "unreachable" in caplog.text, what="a failed registration")
    agent.request_stop()
    await asyncio.wait_for(job, 5)
    assert "stopped before it could register" in caplog.text


# -- leases and registration -------------------------------------------------------------


async def test_stale_completion_is_refused_logged_and_the_worker_serves_on(
    server, client, tmp_path, caplog
):
    """The lease ran out while the action ran and another worker holds the task now:
    the late CompleteTask is ABORTED, changes nothing, and the worker keeps serving."""
    caplog.set_level(logging.INFO, logger="expbuild.worker")
    gate, pid_file = tmp_path / "gate", tmp_path / "pid"
    # No heartbeat during the test: it would report the lease lost and stop the action
    # before it could report. One slot: no poll of this agent competes for the requeued task.
    agent = WorkerAgent(
        settings_for(
            server.port,
            tmp_path / "work",
            heartbeat_interval=timedelta(minutes=5),
            max_concurrent_tasks=1,
        )
    )
    waiting = f"echo $$ > {pid_file}; while [ ! -e {gate} ]; do sleep 0.02; done; echo late"
    async with running_agent(agent):
        submitted = await client.submit(["sh", "-c", waiting])
        task_id = await client.task_id(submitted)
        await wait_until(pid_in(pid_file), what="the action to start")

        await server.pool.execute(
            "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
            task_id,
        )
        await server.reap_once()
        async with open_channel(f"127.0.0.1:{server.port}") as channel:
            other = worker_pb2_grpc.WorkerServiceStub(channel)
            registered = await other.RegisterWorker(
                worker_pb2.RegisterWorkerRequest(name="other-worker", max_concurrent_tasks=1)
            )
            wait = duration_pb2.Duration(seconds=5)
            polled = await other.PollTasks(
                worker_pb2.PollTasksRequest(
                    worker_id=registered.worker_id, max_tasks=1, timeout=wait
                )
            )
            (stolen,) = polled.tasks
            assert stolen.task_id == f"task-{task_id}"
            assert stolen.attempt == 2

            gate.touch()
            refused = f"Server refused the result of task task-{task_id}"
            await wait_until(lambda: refused in caplog.text, what="the refusal")
            task = await server.pool.fetchrow(
                "SELECT state, worker_id FROM tasks WHERE id = $1", task_id
            )
            assert (task["state"], task["worker_id"]) == ("leased", registered.worker_id)

            # The worker serves on.
            after = await client.response(await client.submit(["sh", "-c", "echo next"]))
            assert after.status.code == code_pb2.OK
            assert await client.read(after.result.stdout_digest) == b"next\n"

            # The current lease holder's result is the one the client gets.
            mine = re_pb2.ExecuteResponse(result=re_pb2.ActionResult(exit_code=3))
            await other.CompleteTask(
                worker_pb2.CompleteTaskRequest(
                    worker_id=registered.worker_id,
                    task_id=stolen.task_id,
                    lease_token=stolen.lease_token,
                    response=mine,
                )
            )
            assert (await client.response(submitted)).result.exit_code == 3

    warning = next(r for r in caplog.records if refused in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert "ABORTED" in warning.getMessage()
    assert (await client.events(task_id)).count("completed") == 1


@pytest.fixture
async def long_poll_server(database_url, tmp_path) -> AsyncIterator[ServerApp]:
    async with running_server(long_poll_settings(tmp_path / "cas"), database_url) as app:
        yield app


async def test_reregisters_when_the_server_forgets_it(long_poll_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="expbuild.worker")
    server = long_poll_server
    # The agent's poll stays in flight meanwhile, so it is the heartbeat that finds out.
    agent = WorkerAgent(
        settings_for(server.port, tmp_path / "work", poll_timeout=timedelta(minutes=1))
    )
    async with client_of(server, tmp_path) as client, running_agent(agent):
        await wait_until(lambda: agent.worker_id, what="registration")
        worker_id = agent.worker_id
        # Only once the poll is parked on the server (past its check of the worker) may the
        # worker be forgotten: otherwise the poll, not the heartbeat, could notice first.
        await wait_until(lambda: server.notifications._pollers, what="a parked poll")
        await server.pool.execute("DELETE FROM workers WHERE id = $1", worker_id)

        async def known_again() -> bool:
            return bool(
                await server.pool.fetchval("SELECT count(*) FROM workers WHERE id = $1", worker_id)
            )

        await wait_until(known_again, what="registering again")
        response = await client.response(await client.submit(["sh", "-c", "echo again"]))
        assert response.status.code == code_pb2.OK

    assert agent.worker_id == worker_id  # it came back under its old id
    assert f"Server does not know worker {worker_id}; registering again" in caplog.text
    assert caplog.text.count(f"Worker {worker_id} registered successfully") == 2


async def test_retries_registration_until_the_server_is_up(database_url, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="expbuild.worker")
    port = free_port()
    agent = WorkerAgent(settings_for(port, tmp_path / "work"))
    async with running_agent(agent):
        await wait_until(
            lambda: f"Server 127.0.0.1:{port} unreachable" in caplog.text, what="retry warning"
        )
        settings: Settings = server_settings(tmp_path / "cas")
        settings = replace(settings, server=replace(settings.server, address=f"127.0.0.1:{port}"))
        async with running_server(settings, database_url) as late:
            await wait_until(lambda: agent.worker_id, what="registration", timeout=20)
            async with client_of(late, tmp_path) as client:
                response = await client.response(await client.submit(["sh", "-c", "echo up"]))
            assert response.status.code == code_pb2.OK
            name = await late.pool.fetchval(
                "SELECT name FROM workers WHERE id = $1", agent.worker_id
            )
            assert name == "test-worker"
    assert "retrying in 1s" in caplog.text
