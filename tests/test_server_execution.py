"""Execution and the Worker API through real gRPC against real Postgres.

The "worker" here is a plain Worker API client driven by the test, so each step of the
protocol (poll, heartbeat, complete with a stale token) can be checked on its own.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from expbuild.digest import digest_of
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.proto import worker_pb2, worker_pb2_grpc
from tests.serving import running_server, server_settings
from tests.waiting import wait_until


@pytest.fixture
async def server(database_url, tmp_path):
    async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
        yield app


@pytest.fixture
async def slow_fallback_server(database_url, tmp_path):
    """Polls last an hour and never fall back to re-checking the database sooner, so a poll
    answered within a test's bound (a minute) was woken by NOTIFY: no clock to race."""
    settings = server_settings(
        tmp_path / "cas",
        notify_fallback_interval=timedelta(hours=1),
        poll_timeout=timedelta(hours=1),
    )
    async with running_server(settings, database_url) as app:
        yield app


def idle_pollers(app, count: int):
    """A predicate: exactly `count` long polls of `app` wait for a wake-up."""
    return lambda: app.notifications.idle_pollers == count


def channel_to(app) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")


async def put_action(store, argv=("echo", "hi"), *, do_not_cache=False, platform=()):
    command = re_pb2.Command(arguments=list(argv))
    for name, value in platform:
        command.platform.properties.add(name=name, value=value)
    root = re_pb2.Directory()
    blobs = {}
    for message in (command, root):
        data = message.SerializeToString()
        blobs[digest_of(data)] = data
    command_digest, root_digest = list(blobs)
    action = re_pb2.Action(
        command_digest=command_digest.to_proto(),
        input_root_digest=root_digest.to_proto(),
        do_not_cache=do_not_cache,
    )
    data = action.SerializeToString()
    blobs[digest_of(data)] = data
    for digest, payload in blobs.items():
        await store.put(digest, payload)
    return digest_of(data)


async def register(stub, name="w1", **platform) -> str:
    request = worker_pb2.RegisterWorkerRequest(name=name, max_concurrent_tasks=2)
    for key, value in (platform or {"OSFamily": "Linux"}).items():
        request.platform.properties.add(name=key, value=value)
    return (await stub.RegisterWorker(request)).worker_id


def result_response(exit_code=0, stdout=b"") -> re_pb2.ExecuteResponse:
    return re_pb2.ExecuteResponse(
        result=re_pb2.ActionResult(exit_code=exit_code, stdout_raw=stdout),
        status=status_pb2.Status(code=code_pb2.OK),
    )


def unpack_response(operation) -> re_pb2.ExecuteResponse:
    response = re_pb2.ExecuteResponse()
    operation.response.Unpack(response)
    return response


def stage(operation) -> int:
    metadata = re_pb2.ExecuteOperationMetadata()
    operation.metadata.Unpack(metadata)
    return metadata.stage


async def test_execute_runs_through_the_worker_api_and_then_hits_the_cache(server):
    digest = await put_action(server.store)
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        worker_id = await register(workers)

        stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
        first = await stream.read()
        assert not first.done and stage(first) == re_pb2.ExecutionStage.CACHE_CHECK
        second = await stream.read()
        assert not second.done and stage(second) == re_pb2.ExecutionStage.QUEUED

        polled = await workers.PollTasks(
            worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=2)
        )
        [task] = polled.tasks
        assert task.action_digest.hash == digest.hash and list(task.command.arguments) == [
            "echo",
            "hi",
        ]
        await workers.CompleteTask(
            worker_pb2.CompleteTaskRequest(
                worker_id=worker_id,
                task_id=task.task_id,
                lease_token=task.lease_token,
                response=result_response(0, b"hi\n"),
            )
        )

        operations = await _rest(stream)
        assert operations[-1].done
        response = unpack_response(operations[-1])
        assert response.result.stdout_raw == b"hi\n" and not response.cached_result

        again = [
            op
            async for op in execution.Execute(
                re_pb2.ExecuteRequest(action_digest=digest.to_proto())
            )
        ]
        assert [stage(op) for op in again] == [
            re_pb2.ExecutionStage.CACHE_CHECK,
            re_pb2.ExecutionStage.COMPLETED,
        ]
        assert again[-1].done
        assert unpack_response(again[-1]).cached_result

        got = await operations_pb2_grpc.OperationsStub(channel).GetOperation(
            operations_pb2.GetOperationRequest(name=operations[-1].name)
        )
        assert got.done and unpack_response(got).result.stdout_raw == b"hi\n"


async def test_a_task_failed_by_its_worker_is_logged_as_failed_not_completed(server, caplog):
    digest = await put_action(server.store)
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        worker_id = await register(workers)
        stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
        polled = await workers.PollTasks(
            worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=1)
        )
        [task] = polled.tasks
        refused = status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT, message="output path 'x' leads outside the input root"
        )
        with caplog.at_level(logging.INFO, logger="expbuild.scheduling.results"):
            await workers.CompleteTask(
                worker_pb2.CompleteTaskRequest(
                    worker_id=worker_id,
                    task_id=task.task_id,
                    lease_token=task.lease_token,
                    response=re_pb2.ExecuteResponse(status=refused),
                )
            )
        operations = await _rest(stream)
    assert unpack_response(operations[-1]).status.code == code_pb2.INVALID_ARGUMENT
    [line] = [r.getMessage() for r in caplog.records if task.task_id in r.getMessage()]
    assert line == (
        f"Task {task.task_id} failed on worker {worker_id}: INVALID_ARGUMENT: "
        "output path 'x' leads outside the input root"
    )


async def test_missing_inputs_fail_with_precondition_failure(server):
    action = re_pb2.Action(
        command_digest=digest_of(b"nope").to_proto(), input_root_digest=digest_of(b"").to_proto()
    )
    data = action.SerializeToString()
    await server.store.put(digest_of(data), data)
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in execution.Execute(
                re_pb2.ExecuteRequest(action_digest=digest_of(data).to_proto())
            ):
                pass
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = dict(info.value.trailing_metadata())["grpc-status-details-bin"]
        status = status_pb2.Status.FromString(details)
        failure = error_details_pb2.PreconditionFailure()
        status.details[0].Unpack(failure)
        subjects = [(v.type, v.subject) for v in failure.violations]
        assert subjects == [("MISSING", f"blobs/{digest_of(b'nope').hash}/4")]

        # The action itself missing, and a malformed digest: each a clear error; server serves on.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in execution.Execute(
                re_pb2.ExecuteRequest(action_digest=digest_of(b"x").to_proto())
            ):
                pass
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in execution.Execute(
                re_pb2.ExecuteRequest(action_digest=re_pb2.Digest(hash="abc", size_bytes=-1))
            ):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "action_digest" in info.value.details()


async def test_identical_executes_share_one_task(server):
    digest = await put_action(server.store)
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        worker_id = await register(workers)
        streams = [
            execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
            for _ in range(3)
        ]
        firsts = [await s.read() for s in streams]
        assert len({op.name for op in firsts}) == 3
        polled = await workers.PollTasks(
            worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=2)
        )
        assert len(polled.tasks) == 1
        task = polled.tasks[0]
        await workers.CompleteTask(
            worker_pb2.CompleteTaskRequest(
                worker_id=worker_id,
                task_id=task.task_id,
                lease_token=task.lease_token,
                response=result_response(0, b"once"),
            )
        )
        for stream in streams:
            last = await _last(stream)
            assert unpack_response(last).result.stdout_raw == b"once"


async def test_stale_lease_token_is_aborted_and_the_server_keeps_serving(server):
    digest = await put_action(server.store, do_not_cache=True)
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        worker_id = await register(workers)
        stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
        await stream.read()
        [task] = (
            await workers.PollTasks(worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=1))
        ).tasks
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await workers.CompleteTask(
                worker_pb2.CompleteTaskRequest(
                    worker_id=worker_id,
                    task_id=task.task_id,
                    lease_token="00000000-0000-0000-0000-000000000000",
                    response=result_response(),
                )
            )
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert "lease token" in info.value.details()
        await workers.CompleteTask(
            worker_pb2.CompleteTaskRequest(
                worker_id=worker_id,
                task_id=task.task_id,
                lease_token=task.lease_token,
                response=result_response(3),
            )
        )
        last = await _last(stream)
        assert unpack_response(last).result.exit_code == 3


async def test_poll_wakes_on_notify_without_waiting_for_the_timeout(slow_fallback_server):
    server = slow_fallback_server
    digest = await put_action(server.store)
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        worker_id = await register(workers)
        poll = asyncio.ensure_future(
            workers.PollTasks(worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=1))
        )
        await wait_until(idle_pollers(server, 1), what="the poll waiting for a wake-up")
        assert not poll.done()
        stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
        await stream.read()
        polled = await asyncio.wait_for(poll, 60)  # only NOTIFY ends it this soon
        assert len(polled.tasks) == 1
        stream.cancel()


async def test_a_client_on_one_replica_sees_completion_through_another(database_url, tmp_path):
    cas = tmp_path / "cas"
    async with (
        running_server(server_settings(cas), database_url) as a,
        running_server(server_settings(cas), database_url) as b,
    ):
        digest = await put_action(a.store)
        async with channel_to(a) as ca, channel_to(b) as cb:
            stream = re_grpc.ExecutionStub(ca).Execute(
                re_pb2.ExecuteRequest(action_digest=digest.to_proto())
            )
            await stream.read()
            workers = worker_pb2_grpc.WorkerServiceStub(cb)
            worker_id = await register(workers)
            [task] = (
                await workers.PollTasks(
                    worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=1)
                )
            ).tasks
            await workers.CompleteTask(
                worker_pb2.CompleteTaskRequest(
                    worker_id=worker_id,
                    task_id=task.task_id,
                    lease_token=task.lease_token,
                    response=result_response(0, b"via b"),
                )
            )
            last = await asyncio.wait_for(_last(stream), timeout=5)
            assert unpack_response(last).result.stdout_raw == b"via b"


async def _last(stream):
    return (await _rest(stream))[-1]


async def _rest(stream) -> list:
    """The operations left on a stream already read from (grpc.aio forbids mixing read() and
    async iteration on one call)."""
    found = []
    while True:
        operation = await stream.read()
        if operation is grpc.aio.EOF:
            return found
        found.append(operation)


async def test_heartbeat_reports_lost_tasks_and_unknown_workers(server):
    async with channel_to(server) as channel:
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        reply = await workers.Heartbeat(worker_pb2.HeartbeatRequest(worker_id="worker-ghost"))
        assert reply.reregister
        worker_id = await register(workers)
        reply = await workers.Heartbeat(
            worker_pb2.HeartbeatRequest(
                worker_id=worker_id,
                running=[
                    worker_pb2.TaskLease(
                        task_id="task-999", lease_token="00000000-0000-0000-0000-000000000000"
                    )
                ],
            )
        )
        assert list(reply.lost_task_ids) == ["task-999"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await workers.Heartbeat(
                worker_pb2.HeartbeatRequest(
                    worker_id=worker_id,
                    running=[worker_pb2.TaskLease(task_id="bogus", lease_token="x")],
                )
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_one_task_wakes_one_idle_poller_not_all(slow_fallback_server):
    server = slow_fallback_server
    """With many idle workers on a replica, a new task sends one of them to the database."""
    digest = await put_action(server.store)
    async with channel_to(server) as channel:
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        ids = [await register(workers, f"w{n}") for n in range(6)]
        polls = [
            asyncio.ensure_future(
                workers.PollTasks(worker_pb2.PollTasksRequest(worker_id=w, max_tasks=1))
            )
            for w in ids
        ]
        await wait_until(idle_pollers(server, 6), what="six polls waiting for a wake-up")
        before = await _lease_attempts(server)
        stream = re_grpc.ExecutionStub(channel).Execute(
            re_pb2.ExecuteRequest(action_digest=digest.to_proto())
        )
        await stream.read()
        done, _pending = await asyncio.wait(polls, return_when=asyncio.FIRST_COMPLETED, timeout=60)
        assert sum(len(p.result().tasks) for p in done) == 1
        # Waking every poller would empty the waiting list at once; the five without a
        # task are waiting again only after each ran its lease statement.
        await wait_until(idle_pollers(server, 5), what="the other five polls waiting again")
        assert await _lease_attempts(server) - before <= 2, "every idle poller went to the database"
        for poll in polls:
            poll.cancel()
        stream.cancel()


async def _lease_attempts(server) -> int:
    """Lease statements this process's replicas ran for polling workers."""
    from prometheus_client import REGISTRY

    return sum(
        REGISTRY.get_sample_value("expbuild_lease_attempts_total", {"outcome": o}) or 0
        for o in ("leased", "empty")
    )


async def test_a_wake_passes_over_pollers_of_another_platform(slow_fallback_server):
    server = slow_fallback_server
    digest = await put_action(server.store, platform=[("OSFamily", "Linux")])
    async with channel_to(server) as channel:
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        macs = [await register(workers, f"mac{n}", OSFamily="Darwin") for n in range(3)]
        linux = await register(workers, "linux", OSFamily="Linux")
        mac_polls = [
            asyncio.ensure_future(
                workers.PollTasks(worker_pb2.PollTasksRequest(worker_id=w, max_tasks=1))
            )
            for w in macs
        ]
        # The Mac pollers wait longest, so they are woken first.
        await wait_until(idle_pollers(server, 3), what="the Mac polls waiting")
        linux_poll = asyncio.ensure_future(
            workers.PollTasks(worker_pb2.PollTasksRequest(worker_id=linux, max_tasks=1))
        )
        await wait_until(idle_pollers(server, 4), what="the Linux poll waiting")
        stream = re_grpc.ExecutionStub(channel).Execute(
            re_pb2.ExecuteRequest(action_digest=digest.to_proto())
        )
        await stream.read()
        # Only the wake-up passed along by the Mac polls ends it this soon.
        assert len((await asyncio.wait_for(linux_poll, 60)).tasks) == 1
        for poll in mac_polls:
            poll.cancel()
        stream.cancel()


async def _complete(workers, worker_id: str, task, stdout: bytes = b"") -> None:
    await workers.CompleteTask(
        worker_pb2.CompleteTaskRequest(
            worker_id=worker_id,
            task_id=task.task_id,
            lease_token=task.lease_token,
            response=result_response(0, stdout),
        )
    )


async def _poll_now(workers, worker_id: str) -> list:
    """One poll that does not wait: what it leased."""
    request = worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=2)
    request.timeout.FromTimedelta(timedelta(0))
    return list((await workers.PollTasks(request)).tasks)


async def test_a_drained_worker_polls_nothing_and_another_gets_the_task(server):
    """The poll does not read the worker (the replica keeps its record): the lease itself
    refuses a worker an admin drained, even when it polls before its heartbeat hears so."""
    first, second = await put_action(server.store, ("a",)), await put_action(server.store, ("b",))
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        drained, other = await register(workers, "drained"), await register(workers, "other")
        stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=first.to_proto()))
        await stream.read()
        [task] = await _poll_now(workers, drained)  # the replica now keeps its record
        await _complete(workers, drained, task)
        await _rest(stream)

        admin = worker_pb2_grpc.WorkerAdminServiceStub(channel)
        await admin.DrainWorker(worker_pb2.DrainWorkerRequest(worker_id=drained))
        stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=second.to_proto()))
        await stream.read()
        assert await _poll_now(workers, drained) == []
        [task] = await _poll_now(workers, other)
        assert task.action_digest.hash == second.hash
        await _complete(workers, other, task)
        assert (await _rest(stream))[-1].done


async def test_a_worker_registered_again_elsewhere_with_another_platform(database_url, tmp_path):
    """Replica `a` keeps the worker's old platform (Linux); the worker registered again
    through `b` as a Mac. `a` must not lease it a Linux task, then learns the new platform."""
    cas = tmp_path / "cas"
    async with (
        running_server(server_settings(cas), database_url) as a,
        running_server(server_settings(cas), database_url) as b,
    ):
        linux = [
            await put_action(a.store, (f"l{n}",), platform=[("OSFamily", "Linux")]) for n in (1, 2)
        ]
        mac = await put_action(a.store, ("m",), platform=[("OSFamily", "Darwin")])
        async with channel_to(a) as ca, channel_to(b) as cb:
            execution = re_grpc.ExecutionStub(ca)
            at_a, at_b = (
                worker_pb2_grpc.WorkerServiceStub(ca),
                worker_pb2_grpc.WorkerServiceStub(cb),
            )
            worker_id = await register(at_a, OSFamily="Linux")
            stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=linux[0].to_proto()))
            await stream.read()
            [task] = await _poll_now(at_a, worker_id)
            await _complete(at_a, worker_id, task)
            await _rest(stream)

            request = worker_pb2.RegisterWorkerRequest(
                worker_id=worker_id, name="w1", max_concurrent_tasks=2
            )
            request.platform.properties.add(name="OSFamily", value="Darwin")
            assert (await at_b.RegisterWorker(request)).worker_id == worker_id
            streams = [
                execution.Execute(re_pb2.ExecuteRequest(action_digest=d.to_proto()))
                for d in (linux[1], mac)
            ]
            for s in streams:
                await s.read()
            assert await _poll_now(at_a, worker_id) == []  # not the Linux task
            [task] = await _poll_now(at_a, worker_id)  # the empty poll dropped the old record
            assert task.action_digest.hash == mac.hash
            for s in streams:
                s.cancel()


def _executing(operation) -> re_pb2.ExecutedActionMetadata:
    metadata = re_pb2.ExecuteOperationMetadata()
    operation.metadata.Unpack(metadata)
    assert metadata.stage == re_pb2.ExecutionStage.EXECUTING, metadata
    return metadata.partial_execution_metadata


async def test_a_stream_follows_a_lease_and_completion_on_another_replica(database_url, tmp_path):
    """Execute on `a`, leased and finished through `b`: `a`'s stream shows EXECUTING with
    the worker and the lease's times (from the lease's notification, not a read) exactly as
    the database has them, then ends with the result."""
    cas = tmp_path / "cas"
    async with (
        running_server(server_settings(cas), database_url) as a,
        running_server(server_settings(cas), database_url) as b,
    ):
        digest = await put_action(a.store)
        async with channel_to(a) as ca, channel_to(b) as cb:
            stream = re_grpc.ExecutionStub(ca).Execute(
                re_pb2.ExecuteRequest(action_digest=digest.to_proto(), skip_cache_lookup=True)
            )
            queued = await stream.read()
            assert stage(queued) == re_pb2.ExecutionStage.QUEUED
            workers = worker_pb2_grpc.WorkerServiceStub(cb)
            worker_id = await register(workers, "on-b")
            [task] = await _poll_now(workers, worker_id)
            executing = _executing(await asyncio.wait_for(stream.read(), 60))
            read = await operations_pb2_grpc.OperationsStub(cb).GetOperation(
                operations_pb2.GetOperationRequest(name=queued.name)
            )
            assert executing.worker == "on-b"
            assert executing == _executing(read)  # the same worker, queued and start times
            await _complete(workers, worker_id, task, b"via b")
            last = await asyncio.wait_for(_last(stream), timeout=60)
            assert last.done and unpack_response(last).result.stdout_raw == b"via b"


async def test_an_execute_stream_takes_the_stage_from_notifications_not_reads(server):
    """A stream following the task its Execute queued does not read the operation back
    until a notification says less than a lease: a lease notification alone (sent by hand
    here; the task is still queued in the database) makes it report EXECUTING."""
    digest = await put_action(server.store)
    async with channel_to(server) as channel:
        stream = re_grpc.ExecutionStub(channel).Execute(
            re_pb2.ExecuteRequest(action_digest=digest.to_proto(), skip_cache_lookup=True)
        )
        queued = await stream.read()
        task_id = await server.pool.fetchval(
            "SELECT task_id FROM operations WHERE name = $1", queued.name
        )
        await server.pool.execute(
            "SELECT pg_notify('expbuild_task_done', $1)",
            f"leased 1733389202000000 {task_id}:1733389201000000 told-by-notify",
        )
        executing = _executing(await asyncio.wait_for(stream.read(), 60))
        assert executing.worker == "told-by-notify"
        assert executing.worker_start_timestamp.seconds == 1733389202
        # A bare id says "read it": the read finds the task cancelled and the stream ends.
        await server.pool.execute("UPDATE tasks SET state = 'cancelled' WHERE id = $1", task_id)
        await server.pool.execute("SELECT pg_notify('expbuild_task_done', $1)", str(task_id))
        last = await asyncio.wait_for(_last(stream), timeout=60)
        assert last.done and unpack_response(last).status.code == code_pb2.CANCELLED
