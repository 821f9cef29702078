"""WorkerAgent against a small in-process gRPC server: an in-memory CAS and a Worker API
the test scripts (which tasks to hand out, which to cancel, what CompleteTask answers).

Real gRPC, real processes, real files. The end-to-end run against the real server and
PostgreSQL lives with the server's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2

from expbuild.client.tree import merkle_tree_from_directory
from expbuild.config import BackendSettings, WorkerSettings
from expbuild.digest import Digest, digest_of
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.proto import worker_pb2, worker_pb2_grpc
from expbuild.worker.agent import WorkerAgent
from expbuild.worker.runner import missing_digests

WORKER_ID = "worker-abc123"


class MemoryCas(re_grpc.ContentAddressableStorageServicer):
    def __init__(self) -> None:
        self.blobs: dict[Digest, bytes] = {}

    def put(self, data: bytes) -> Digest:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    async def FindMissingBlobs(self, request, context):
        missing = [d for d in request.blob_digests if Digest.from_proto(d) not in self.blobs]
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=missing)

    async def BatchUpdateBlobs(self, request, context):
        response = re_pb2.BatchUpdateBlobsResponse()
        for entry in request.requests:
            digest = Digest.from_proto(entry.digest)
            assert digest_of(entry.data) == digest
            self.blobs[digest] = entry.data
            response.responses.add(digest=entry.digest)
        return response

    async def BatchReadBlobs(self, request, context):
        response = re_pb2.BatchReadBlobsResponse()
        for proto in request.digests:
            digest = Digest.from_proto(proto)
            entry = response.responses.add(digest=proto)
            if digest in self.blobs:
                entry.data = self.blobs[digest]
            else:
                entry.status.code = code_pb2.NOT_FOUND
                entry.status.message = f"blob {digest} not found"
        return response


@dataclass
class ScriptedWorkerApi(worker_pb2_grpc.WorkerServiceServicer):
    """Hands out queued tasks and records everything the worker says."""

    heartbeat_seconds: float = 0.2
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    registrations: list = field(default_factory=list)
    heartbeats: list = field(default_factory=list)
    polls: list = field(default_factory=list)
    completed: dict[str, worker_pb2.CompleteTaskRequest] = field(default_factory=dict)
    released: list = field(default_factory=list)
    deregistered: list = field(default_factory=list)
    cancel: set[str] = field(default_factory=set)
    abort_completion: set[str] = field(default_factory=set)
    forget_worker: bool = False

    async def RegisterWorker(self, request, context):
        self.registrations.append(request)
        self.forget_worker = False
        interval = duration_pb2.Duration()
        interval.FromTimedelta(timedelta(seconds=self.heartbeat_seconds))
        return worker_pb2.RegisterWorkerResponse(worker_id=WORKER_ID, heartbeat_interval=interval)

    async def Heartbeat(self, request, context):
        self.heartbeats.append(request)
        if self.forget_worker:
            return worker_pb2.HeartbeatResponse(reregister=True)
        running = {lease.task_id for lease in request.running}
        return worker_pb2.HeartbeatResponse(cancelled_task_ids=sorted(running & self.cancel))

    async def PollTasks(self, request, context):
        self.polls.append(request)
        tasks = []
        try:
            first = await asyncio.wait_for(
                self.queue.get(), request.timeout.ToTimedelta().total_seconds()
            )
        except TimeoutError:
            return worker_pb2.PollTasksResponse()
        tasks.append(first)
        while len(tasks) < request.max_tasks and not self.queue.empty():
            tasks.append(self.queue.get_nowait())
        return worker_pb2.PollTasksResponse(tasks=tasks)

    async def CompleteTask(self, request, context):
        if request.task_id in self.abort_completion:
            await context.abort(grpc.StatusCode.ABORTED, "lease token is stale")
        self.completed[request.task_id] = request
        return worker_pb2.CompleteTaskResponse()

    async def ReleaseTask(self, request, context):
        self.released.append(request)
        return worker_pb2.ReleaseTaskResponse()

    async def DeregisterWorker(self, request, context):
        self.deregistered.append(request.worker_id)
        return worker_pb2.DeregisterWorkerResponse()


@dataclass
class FakeServer:
    port: int
    cas: MemoryCas
    api: ScriptedWorkerApi

    def task(
        self,
        task_id: str,
        arguments: list[str],
        *,
        inputs: Path | None = None,
        output_paths: tuple[str, ...] = (),
        timeout: float | None = None,
        input_root: Digest | None = None,
    ) -> worker_pb2.Task:
        command = re_pb2.Command(arguments=arguments, output_paths=list(output_paths))
        command.environment_variables.add(name="PATH", value="/usr/bin:/bin")
        if input_root is None:
            if inputs is None:
                input_root = self.cas.put(re_pb2.Directory().SerializeToString())
            else:
                tree = merkle_tree_from_directory(inputs)
                for digest, blob in tree.blobs.items():
                    self.cas.blobs[digest] = blob.read_bytes() if isinstance(blob, Path) else blob
                input_root = tree.root_digest
        action = re_pb2.Action(
            command_digest=self.cas.put(command.SerializeToString()).to_proto(),
            input_root_digest=input_root.to_proto(),
        )
        task = worker_pb2.Task(
            task_id=task_id,
            lease_token=str(uuid.uuid4()),
            action_digest=self.cas.put(action.SerializeToString()).to_proto(),
            action=action,
            command=command,
            attempt=1,
        )
        task.queued_at.GetCurrentTime()
        if timeout is not None:
            task.timeout.FromTimedelta(timedelta(seconds=timeout))
        return task

    def submit(self, *args, **kwargs) -> worker_pb2.Task:
        task = self.task(*args, **kwargs)
        self.api.queue.put_nowait(task)
        return task


@contextlib.asynccontextmanager
async def fake_server(port: int = 0) -> AsyncIterator[FakeServer]:
    server = grpc.aio.server()
    cas, api = MemoryCas(), ScriptedWorkerApi()
    re_grpc.add_ContentAddressableStorageServicer_to_server(cas, server)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(api, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield FakeServer(port, cas, api)
    finally:
        await server.stop(0)


@pytest.fixture
async def server():
    async with fake_server() as running:
        yield running


def settings_for(port: int, work_dir: Path, **overrides) -> WorkerSettings:
    settings = WorkerSettings(
        server_url=f"http://127.0.0.1:{port}",
        name="test-worker",
        max_concurrent_tasks=2,
        poll_timeout=timedelta(seconds=1),
        backend=BackendSettings(type="host", work_dir=str(work_dir)),
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


async def eventually(predicate, seconds: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


async def test_runs_a_task_end_to_end(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="expbuild.worker")
    inputs = tmp_path / "inputs"
    (inputs / "src").mkdir(parents=True)
    (inputs / "src" / "in.txt").write_text("hello worker\n")
    work_dir = tmp_path / "work"
    agent = WorkerAgent(settings_for(server.port, work_dir), shutdown_grace=5)
    argv = ["sh", "-c", "tr a-z A-Z < src/in.txt > out/upper.txt; echo done; echo warn >&2"]
    task = server.submit("task-42", argv, inputs=inputs, output_paths=("out/upper.txt",))

    async with running_agent(agent):
        await eventually(lambda: "task-42" in server.api.completed, what="CompleteTask")

    request = server.api.completed["task-42"]
    assert request.worker_id == WORKER_ID
    assert request.lease_token == task.lease_token
    response = request.response
    assert response.status.code == code_pb2.OK
    result = response.result
    assert result.exit_code == 0
    (output,) = result.output_files
    assert output.path == "out/upper.txt"
    assert server.cas.blobs[Digest.from_proto(output.digest)] == b"HELLO WORKER\n"
    assert server.cas.blobs[Digest.from_proto(result.stdout_digest)] == b"done\n"
    assert server.cas.blobs[Digest.from_proto(result.stderr_digest)] == b"warn\n"

    metadata = result.execution_metadata
    assert metadata.worker == "test-worker"
    assert metadata.queued_timestamp == task.queued_at
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

    (registration,) = server.api.registrations
    assert registration.name == "test-worker"
    assert registration.max_concurrent_tasks == 2
    assert {p.name for p in registration.platform.properties} >= {"OSFamily", "Arch"}
    assert server.api.deregistered == [WORKER_ID]
    assert list(work_dir.iterdir()) == []  # the action directory is gone

    text = caplog.text
    action_digest = Digest.from_proto(task.action_digest)
    for line in (
        f"Worker {WORKER_ID} registered successfully",
        "Starting execution of task task-42",
        f"Downloading action {action_digest}",
        f"Downloading command {Digest.from_proto(task.action.command_digest)}",
        'Executing command: ["sh", "-c", ',
        "Command exited with code: 0",
        "Task task-42 completed successfully",
    ):
        assert line in text, line


async def test_configured_platform_wins_over_detected(server, tmp_path):
    settings = settings_for(
        server.port, tmp_path / "work", platform={"OSFamily": ("Plan9",), "pool": ("a", "b")}
    )
    async with running_agent(WorkerAgent(settings)):
        await eventually(lambda: server.api.registrations, what="registration")
    properties = [(p.name, p.value) for p in server.api.registrations[0].platform.properties]
    assert ("OSFamily", "Plan9") in properties
    assert ("pool", "a") in properties and ("pool", "b") in properties
    assert "Arch" in {name for name, _ in properties}
    assert properties == sorted(properties)


async def test_failing_command_and_timeout(server, tmp_path):
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work"))
    server.submit("task-1", ["sh", "-c", "echo partial; exit 7"])
    server.submit("task-2", ["sh", "-c", "echo before; sleep 30"], timeout=0.5)
    async with running_agent(agent):
        await eventually(lambda: len(server.api.completed) == 2, what="both tasks")

    failed = server.api.completed["task-1"].response
    assert failed.status.code == code_pb2.OK
    assert failed.result.exit_code == 7
    assert server.cas.blobs[Digest.from_proto(failed.result.stdout_digest)] == b"partial\n"

    timed_out = server.api.completed["task-2"].response
    assert timed_out.status.code == code_pb2.DEADLINE_EXCEEDED
    assert timed_out.status.message == "action timed out after 0.5s"
    assert timed_out.HasField("result")
    assert server.cas.blobs[Digest.from_proto(timed_out.result.stdout_digest)] == b"before\n"


async def test_missing_input_fails_the_task_and_the_worker_keeps_serving(server, tmp_path):
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work"))
    absent_root = digest_of(b"a Directory nobody uploaded")
    server.submit("task-1", ["true"], input_root=absent_root)
    server.submit("task-2", ["bad/../path"], output_paths=("../escape",))
    server.submit("task-3", ["sh", "-c", "echo still here"])
    async with running_agent(agent):
        await eventually(lambda: len(server.api.completed) == 3, what="three tasks")

    missing = server.api.completed["task-1"].response
    assert missing.status.code == code_pb2.FAILED_PRECONDITION
    assert missing_digests(missing.status) == [absent_root]
    assert not missing.HasField("result")

    invalid = server.api.completed["task-2"].response
    assert invalid.status.code == code_pb2.INVALID_ARGUMENT
    assert "'../escape' contains '..'" in invalid.status.message

    fine = server.api.completed["task-3"].response
    assert fine.status.code == code_pb2.OK
    assert server.cas.blobs[Digest.from_proto(fine.result.stdout_digest)] == b"still here\n"
    assert list((tmp_path / "work").iterdir()) == []


async def test_unsupported_output_keeps_logs(server, tmp_path):
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work"))
    server.submit("task-1", ["sh", "-c", "mkfifo pipe; echo made it"], output_paths=("pipe",))
    async with running_agent(agent):
        await eventually(lambda: server.api.completed, what="CompleteTask")
    response = server.api.completed["task-1"].response
    assert response.status.code == code_pb2.INVALID_ARGUMENT
    assert "FIFO" in response.status.message
    assert server.cas.blobs[Digest.from_proto(response.result.stdout_digest)] == b"made it\n"


async def test_never_runs_more_than_max_concurrent_tasks(server, tmp_path):
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work", max_concurrent_tasks=2))
    marker = tmp_path / "running"
    marker.mkdir()
    script = f"touch {marker}/$$; n=$(ls {marker} | wc -l); echo $n; sleep 0.4; rm {marker}/$$"
    for i in range(5):
        server.submit(f"task-{i}", ["sh", "-c", script])
    async with running_agent(agent):
        await eventually(lambda: len(server.api.completed) == 5, what="five tasks")
    assert all(0 < poll.max_tasks <= 2 for poll in server.api.polls)
    seen = [
        int(server.cas.blobs[Digest.from_proto(r.response.result.stdout_digest)])
        for r in server.api.completed.values()
    ]
    assert max(seen) <= 2
    assert max(seen) == 2  # and it does run them in parallel


async def test_heartbeat_cancellation_kills_the_action_without_reporting(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="expbuild.worker")
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work"))
    pid_file = tmp_path / "pid"
    server.submit("task-7", ["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"])
    async with running_agent(agent):
        await eventually(pid_file.exists, what="the action to start")
        await eventually(lambda: pid_file.read_text().strip() != "", what="pid")
        pid = int(pid_file.read_text())
        await eventually(
            lambda: any(h.running for h in server.api.heartbeats), what="a heartbeat with the task"
        )
        server.api.cancel.add("task-7")
        await eventually(lambda: is_gone(pid), what="the action to be killed")
        await eventually(lambda: not agent.running_task_ids, what="the task to end")
        server.submit("task-8", ["true"])
        await eventually(lambda: "task-8" in server.api.completed, what="the next task")
    assert "task-7" not in server.api.completed
    assert not server.api.released
    assert "Stopping task task-7: cancelled by the server" in caplog.text
    assert list((tmp_path / "work").iterdir()) == []


async def test_shutdown_waits_for_running_tasks_within_grace(server, tmp_path):
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work"), shutdown_grace=10)
    server.submit("task-1", ["sh", "-c", "sleep 0.5; echo finished"])
    job = asyncio.create_task(agent.run())
    await eventually(lambda: agent.running_task_ids, what="the task to start")
    agent.request_stop()
    await asyncio.wait_for(job, 20)
    assert server.api.completed["task-1"].response.result.exit_code == 0
    assert not server.api.released
    assert server.api.deregistered == [WORKER_ID]


async def test_shutdown_hands_back_tasks_still_running_after_grace(server, tmp_path):
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work"), shutdown_grace=0.3)
    pid_file = tmp_path / "pid"
    task = server.submit("task-9", ["sh", "-c", f"echo $$ > {pid_file}; sleep 300"])
    job = asyncio.create_task(agent.run())
    await eventually(lambda: pid_file.exists() and pid_file.read_text().strip(), what="start")
    pid = int(pid_file.read_text())
    started = time.monotonic()
    agent.request_stop()
    await asyncio.wait_for(job, 20)
    assert time.monotonic() - started < 5
    assert is_gone(pid)
    (released,) = server.api.released
    assert (released.task_id, released.lease_token) == ("task-9", task.lease_token)
    assert released.reason == "worker shutting down"
    assert "task-9" not in server.api.completed
    assert server.api.deregistered == [WORKER_ID]
    assert list((tmp_path / "work").iterdir()) == []


async def test_stop_cancels_the_long_poll_at_once(server, tmp_path):
    agent = WorkerAgent(
        settings_for(server.port, tmp_path / "work", poll_timeout=timedelta(seconds=60))
    )
    job = asyncio.create_task(agent.run())
    await eventually(lambda: server.api.polls, what="a poll")
    started = time.monotonic()
    agent.request_stop()
    await asyncio.wait_for(job, 20)
    assert time.monotonic() - started < 2


async def test_stale_lease_on_completion_is_logged_and_ignored(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="expbuild.worker")
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work"))
    server.api.abort_completion.add("task-1")
    server.submit("task-1", ["true"])
    server.submit("task-2", ["true"])
    async with running_agent(agent):
        await eventually(lambda: "task-2" in server.api.completed, what="task-2")
        await eventually(
            lambda: "Server refused the result of task task-1" in caplog.text, what="warning"
        )
    warning = next(r for r in caplog.records if "refused the result" in r.getMessage())
    assert warning.levelno == logging.WARNING


async def test_reregisters_when_the_server_forgets_it(server, tmp_path):
    agent = WorkerAgent(settings_for(server.port, tmp_path / "work"))
    async with running_agent(agent):
        await eventually(lambda: server.api.heartbeats, what="a heartbeat")
        server.api.forget_worker = True
        await eventually(lambda: len(server.api.registrations) == 2, what="registering again")
    assert server.api.registrations[1].worker_id == WORKER_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_retries_registration_until_the_server_is_up(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="expbuild.worker")
    port = free_port()
    agent = WorkerAgent(settings_for(port, tmp_path / "work"))
    async with running_agent(agent):
        await eventually(
            lambda: f"Server 127.0.0.1:{port} unreachable" in caplog.text, what="retry warning"
        )
        async with fake_server(port) as late:
            await eventually(lambda: late.api.registrations, what="registration", seconds=20)
            late.submit("task-1", ["true"])
            await eventually(lambda: late.api.completed, what="the task")
    assert "retrying in 1s" in caplog.text


async def test_stop_while_server_unreachable_returns(tmp_path):
    agent = WorkerAgent(settings_for(free_port(), tmp_path / "work"))
    job = asyncio.create_task(agent.run())
    await asyncio.sleep(0.3)
    agent.request_stop()
    await asyncio.wait_for(job, 5)


async def test_unusable_work_dir_fails_the_task_with_a_message(server, tmp_path):
    not_a_directory = tmp_path / "work"
    not_a_directory.write_text("a file where the work dir should be")
    agent = WorkerAgent(settings_for(server.port, not_a_directory))
    server.submit("task-1", ["true"])
    async with running_agent(agent):
        await eventually(lambda: server.api.completed, what="CompleteTask")
    status = server.api.completed["task-1"].response.status
    assert status.code == code_pb2.INTERNAL
    assert f"cannot create an action directory in {not_a_directory}" in status.message
