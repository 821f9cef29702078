"""Reliability under faults, in process: database outages answer UNAVAILABLE and streams
resume, a dead worker's leases come back within the disconnect grace, heartbeats
reconcile leases."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import grpc
import pytest

from expbuild.config import BackendSettings, WorkerSettings
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.proto import worker_pb2, worker_pb2_grpc
from expbuild.server.app import ServerApp
from expbuild.worker.agent import WorkerAgent
from tests.secured import CLIENT_SCOPES, make_token, secured_settings
from tests.secured import channel as secured_channel
from tests.serving import running_server, server_settings
from tests.test_server_execution import (
    channel_to,
    put_action,
    register,
    result_response,
    stage,
    unpack_response,
)
from tests.waiting import wait_until

Stage = re_pb2.ExecutionStage


async def lease_one(workers, worker_id: str) -> worker_pb2.Task:
    [task] = (
        await workers.PollTasks(worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=1))
    ).tasks
    return task


async def test_rpcs_answer_unavailable_while_the_database_is_down(restartable_postgres, tmp_path):
    async with running_server(server_settings(tmp_path / "cas"), restartable_postgres.url) as app:
        digest = await put_action(app.store, do_not_cache=True)
        async with channel_to(app) as channel:
            execution = re_grpc.ExecutionStub(channel)
            workers = worker_pb2_grpc.WorkerServiceStub(channel)
            worker_id = await register(workers)
            await asyncio.to_thread(restartable_postgres.stop)
            calls = {
                "Execute": lambda: execution.Execute(
                    re_pb2.ExecuteRequest(action_digest=digest.to_proto())
                ).read(),
                "GetActionResult": lambda: re_grpc.ActionCacheStub(channel).GetActionResult(
                    re_pb2.GetActionResultRequest(action_digest=digest.to_proto())
                ),
                "PollTasks": lambda: workers.PollTasks(
                    worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=1)
                ),
                "Heartbeat": lambda: workers.Heartbeat(
                    worker_pb2.HeartbeatRequest(worker_id=worker_id)
                ),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call()
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, name
                assert "database is unavailable" in info.value.details(), name
            await asyncio.to_thread(restartable_postgres.start)
            # Back without a restart of the server: the pool reconnects on its own.
            stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
            assert stage(await stream.read()) == Stage.CACHE_CHECK
            assert stage(await stream.read()) == Stage.QUEUED
            stream.cancel()
            assert await app.pool.fetchval("SELECT count(*) FROM tasks") == 1


async def test_a_token_checked_while_the_database_is_down_is_unavailable(
    restartable_postgres, tmp_path
):
    settings = secured_settings(tmp_path / "cas")
    async with running_server(settings, restartable_postgres.url) as app:
        secret = await make_token(app.pool, "ci", *CLIENT_SCOPES)
        await asyncio.to_thread(restartable_postgres.stop)
        # The token was never used, so the interceptor must ask the database.
        async with secured_channel(app, secret) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await re_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
                    re_pb2.FindMissingBlobsRequest()
                )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert "database is unavailable" in info.value.details()


async def test_an_execute_stream_rides_out_a_postgres_restart(restartable_postgres, tmp_path):
    async with running_server(server_settings(tmp_path / "cas"), restartable_postgres.url) as app:
        digest = await put_action(app.store, do_not_cache=True)
        async with channel_to(app) as channel:
            workers = worker_pb2_grpc.WorkerServiceStub(channel)
            worker_id = await register(workers)
            stream = re_grpc.ExecutionStub(channel).Execute(
                re_pb2.ExecuteRequest(action_digest=digest.to_proto())
            )
            while stage(await stream.read()) != Stage.QUEUED:
                pass
            await asyncio.to_thread(restartable_postgres.restart)
            deadline = time.monotonic() + 20
            while True:  # the worker side retries as a worker does
                try:
                    task = await lease_one(workers, worker_id)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    assert time.monotonic() < deadline, "the server never got its database back"
                    await asyncio.sleep(0.2)
            await workers.CompleteTask(
                worker_pb2.CompleteTaskRequest(
                    worker_id=worker_id,
                    task_id=task.task_id,
                    lease_token=task.lease_token,
                    response=result_response(stdout=b"after the restart"),
                )
            )
            last = await stream.read()  # the same stream, never broken
            while not last.done:
                last = await stream.read()
            assert last.done
            assert unpack_response(last).result.stdout_raw == b"after the restart"
            assert await app.pool.fetchval("SELECT count(*) FROM tasks") == 1


async def test_a_broken_session_requeues_the_workers_leases_after_the_grace(database_url, tmp_path):
    settings = server_settings(
        tmp_path / "cas",
        worker_disconnect_grace=timedelta(seconds=1),
        reap_interval=timedelta(seconds=60),  # only the session's own follow-up may requeue
    )
    async with running_server(settings, database_url) as app:
        digest = await put_action(app.store, do_not_cache=True)
        async with channel_to(app) as channel:
            workers = worker_pb2_grpc.WorkerServiceStub(channel)
            doomed = await register(workers, "doomed")
            session = workers.OpenSession(worker_pb2.OpenSessionRequest(worker_id=doomed))
            assert (await session.read()).opened
            await (
                re_grpc.ExecutionStub(channel)
                .Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
                .read()
            )
            await lease_one(workers, doomed)
            session.cancel()  # what the server sees when the worker's process dies
            # Long before the 60 s reaper pass: the lost session's own follow-up did it.
            await wait_until(
                lambda: app.pool.fetchval("SELECT state = 'queued' FROM tasks"),
                what="the lease requeued",
            )
            missed = await app.pool.fetchrow(
                "SELECT e.detail->>'reason' AS reason, e.at - w.disconnected_at AS after "
                "FROM task_events e, workers w WHERE e.event = 'heartbeat-missed' AND w.id = $1",
                doomed,
            )
            assert missed["reason"] == "session-lost"
            # Not before the grace, by the database's clock (the one the grace is kept by).
            assert missed["after"] >= timedelta(seconds=1)


async def test_a_session_reopened_within_the_grace_keeps_the_leases(database_url, tmp_path):
    settings = server_settings(tmp_path / "cas", worker_disconnect_grace=timedelta(seconds=1))
    async with running_server(settings, database_url) as app:
        digest = await put_action(app.store, do_not_cache=True)
        async with channel_to(app) as channel:
            workers = worker_pb2_grpc.WorkerServiceStub(channel)
            worker_id = await register(workers)
            first = workers.OpenSession(worker_pb2.OpenSessionRequest(worker_id=worker_id))
            await first.read()
            await (
                re_grpc.ExecutionStub(channel)
                .Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
                .read()
            )
            task = await lease_one(workers, worker_id)
            lost_at = await app.pool.fetchval("SELECT now()")
            first.cancel()
            await wait_until(lambda: app.sessions.held == 0, what="the first session closed")
            second = workers.OpenSession(worker_pb2.OpenSessionRequest(worker_id=worker_id))
            await second.read()
            # Well past the grace by the database's clock, then a reaper pass.
            past_grace = "SELECT now() > $1::timestamptz + interval '2 s'"
            await wait_until(lambda: app.pool.fetchval(past_grace, lost_at), what="the grace over")
            await app.reap_once()
            assert await app.pool.fetchval("SELECT state FROM tasks") == "leased"
            reply = await workers.CompleteTask(
                worker_pb2.CompleteTaskRequest(
                    worker_id=worker_id,
                    task_id=task.task_id,
                    lease_token=task.lease_token,
                    response=result_response(),
                )
            )
            assert reply == worker_pb2.CompleteTaskResponse()
            second.cancel()


async def test_a_lease_the_worker_does_not_report_is_requeued_at_its_heartbeat(
    database_url, tmp_path
):
    async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
        digest = await put_action(app.store, do_not_cache=True)
        async with channel_to(app) as channel:
            workers = worker_pb2_grpc.WorkerServiceStub(channel)
            worker_id = await register(workers)
            await (
                re_grpc.ExecutionStub(channel)
                .Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
                .read()
            )
            await lease_one(workers, worker_id)
            # A heartbeat sent just after the lease spares it (its reply may be in flight).
            await workers.Heartbeat(worker_pb2.HeartbeatRequest(worker_id=worker_id))
            assert await app.pool.fetchval("SELECT state FROM tasks") == "leased"
            # Once the lease is older than the margin, a heartbeat without it requeues it.
            await app.pool.execute("UPDATE tasks SET leased_at = now() - interval '1 minute'")
            await workers.Heartbeat(worker_pb2.HeartbeatRequest(worker_id=worker_id))
            row = await app.pool.fetchrow("SELECT state, worker_id, attempts FROM tasks")
            assert row["state"] == "queued" and row["worker_id"] is None


async def test_a_worker_given_two_replicas_moves_to_the_other_when_one_stops(
    database_url, tmp_path
):
    cas = tmp_path / "cas"
    async with running_server(server_settings(cas), database_url) as b:
        a = ServerApp(server_settings(cas), database_url)
        await a.start()
        settings = WorkerSettings(
            server_url=f"http://127.0.0.1:{a.port},http://127.0.0.1:{b.port}",
            name="roamer",
            max_concurrent_tasks=1,
            poll_timeout=timedelta(seconds=1),
            backend=BackendSettings(type="host", work_dir=str(tmp_path / "work"), run_as="root"),
        )
        agent = WorkerAgent(settings, shutdown_grace=2)
        job = asyncio.create_task(agent.run())
        try:
            await wait_until(lambda: bool(agent.worker_id), what="the worker registered")
            await a.stop(grace=0.5)  # the replica the worker talks to goes away
            digest = await put_action(b.store, ("echo", "moved"), do_not_cache=True)
            async with channel_to(b) as channel:
                stream = re_grpc.ExecutionStub(channel).Execute(
                    re_pb2.ExecuteRequest(action_digest=digest.to_proto())
                )
                last = await asyncio.wait_for(_last_operation(stream), timeout=30)
            result = unpack_response(last).result
            assert result.exit_code == 0
            assert result.execution_metadata.worker == "roamer"
        finally:
            agent.request_stop()
            await asyncio.wait_for(job, 20)


async def _last_operation(stream):
    last = await stream.read()
    while not last.done:
        last = await stream.read()
    return last


async def test_the_reaper_purges_history_past_its_retention(database_url, tmp_path):
    settings = server_settings(tmp_path / "cas", history_retention=timedelta(days=1))
    async with running_server(settings, database_url) as app:
        digest = await put_action(app.store, do_not_cache=True)
        async with channel_to(app) as channel:
            stub = re_grpc.ExecutionStub(channel)
            await stub.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto())).read()
        count = "SELECT count(*) FROM task_events"
        assert await app.pool.fetchval(count) == 1
        await app.reap_once()
        assert await app.pool.fetchval(count) == 1  # within the retention
        await app.pool.execute("UPDATE task_events SET at = now() - interval '2 days'")
        await app.reap_once()
        assert await app.pool.fetchval(count) == 0
