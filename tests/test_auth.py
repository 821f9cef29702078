"""Authentication and authorization against a real server ([auth] mode = "tokens").

Each test performs one of the attacks of issue #8 with real gRPC calls and checks that it
is refused with the right status, and that the legitimate caller still succeeds.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expbuild.auth.scopes import METHOD_SCOPES, SCOPES
from expbuild.client.cas import CasClient
from expbuild.client.channel import ChannelSecurity
from expbuild.client.errors import RemoteError
from expbuild.client.run import run_command
from expbuild.db import tokens as db_tokens
from expbuild.errors import PermissionDenied
from expbuild.proto import bytestream_pb2, worker_pb2, worker_pb2_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from tests.secured import (
    CLIENT_SCOPES,
    action_blobs,
    channel,
    make_token,
    secured_settings,
    token_file,
)
from tests.serving import running_server, running_worker

pytestmark = pytest.mark.e2e

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
async def server(database_url, tmp_path):
    settings = secured_settings(tmp_path / "cas", reject_unmatched_platforms=False)
    async with running_server(settings, database_url) as app:
        yield app


async def refused(call) -> grpc.aio.AioRpcError:
    """The error a call (awaitable, or a response stream) ended with; fails if it succeeded."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return caught.value


async def upload(app, token: str, blobs) -> None:
    async with channel(app, token) as ch:
        cas = await CasClient.connect(ch, "")
        await cas.upload(blobs)


def register_request(name="w1", worker_id="") -> worker_pb2.RegisterWorkerRequest:
    request = worker_pb2.RegisterWorkerRequest(
        worker_id=worker_id, name=name, max_concurrent_tasks=1
    )
    request.platform.properties.add(name="OSFamily", value="Linux")
    return request


async def task_count(app) -> int:
    return await app.pool.fetchval("SELECT count(*) FROM tasks")


def test_every_served_method_needs_a_listed_scope():
    from expbuild.proto import remote_asset_pb2, remote_execution_pb2, worker_pb2

    methods = [
        f"/{service.full_name}/{method.name}"
        for module in (remote_execution_pb2, worker_pb2, bytestream_pb2, remote_asset_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    missing = [m for m in methods if m not in METHOD_SCOPES]
    assert not missing
    assert set(METHOD_SCOPES.values()) <= set(SCOPES) | {"any valid token", "open"}


async def test_unauthenticated_execute_of_id_is_refused(server, tmp_path):
    """The attack: Execute `sh -c id` with no credential ran as root on every worker."""
    client = await make_token(server.pool, "ci", *CLIENT_SCOPES)
    worker = await make_token(server.pool, "worker-a", "worker")
    digest, blobs = action_blobs(("sh", "-c", "id"))
    await upload(server, client, blobs)

    async with channel(server) as anonymous:
        error = await refused(
            re_grpc.ExecutionStub(anonymous).Execute(
                re_pb2.ExecuteRequest(action_digest=digest.to_proto())
            )
        )
        assert error.code() == UNAUTHENTICATED
        assert "authorization: Bearer" in error.details()
        # Nor can it read or write the CAS.
        error = await refused(
            re_grpc.ContentAddressableStorageStub(anonymous).FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest()
            )
        )
        assert error.code() == UNAUTHENTICATED
    async with channel(server, "ebt_made-up") as forged:
        error = await refused(
            re_grpc.ExecutionStub(forged).Execute(
                re_pb2.ExecuteRequest(action_digest=digest.to_proto())
            )
        )
        assert error.code() == UNAUTHENTICATED and "not known" in error.details()
    assert await task_count(server) == 0

    # The same command with a client token runs, on a worker that logged in with its own.
    async with running_worker(server, tmp_path / "work", token_file=token_file(tmp_path, worker)):
        result = await run_command(
            f"127.0.0.1:{server.port}",
            ["sh", "-c", "echo ran"],
            security=ChannelSecurity(token=client),
        )
    assert result.exit_code == 0 and result.stdout == b"ran\n"


async def test_health_is_open_and_capabilities_need_any_token(server):
    async with channel(server) as anonymous:
        health = await health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        error = await refused(
            re_grpc.CapabilitiesStub(anonymous).GetCapabilities(re_pb2.GetCapabilitiesRequest())
        )
        assert error.code() == UNAUTHENTICATED
    reader = await make_token(server.pool, "reader", "cas:read")
    async with channel(server, reader) as ch:
        await re_grpc.CapabilitiesStub(ch).GetCapabilities(re_pb2.GetCapabilitiesRequest())
        error = await refused(
            re_grpc.ContentAddressableStorageStub(ch).BatchUpdateBlobs(
                re_pb2.BatchUpdateBlobsRequest()
            )
        )
        assert error.code() == PERMISSION_DENIED
        assert "cas:write" in error.details() and "'reader'" in error.details()


async def test_a_client_token_cannot_register_as_a_worker(server):
    """The attack: a script registered as a worker and won other clients' tasks."""
    client = await make_token(server.pool, "ci", *CLIENT_SCOPES)
    async with channel(server, client) as ch:
        stub = worker_pb2_grpc.WorkerServiceStub(ch)
        error = await refused(stub.RegisterWorker(register_request("rogue")))
        assert error.code() == PERMISSION_DENIED and "worker" in error.details()
        error = await refused(stub.PollTasks(worker_pb2.PollTasksRequest(worker_id="worker-x")))
        assert error.code() == PERMISSION_DENIED
    assert await server.pool.fetchval("SELECT count(*) FROM workers") == 0


async def test_a_worker_id_belongs_to_the_credential_that_registered_it(server):
    """The attack: RegisterWorker with a real worker's id and a bogus platform starved it."""
    real = await make_token(server.pool, "worker-a", "worker")
    rogue = await make_token(server.pool, "worker-b", "worker")
    async with channel(server, real) as real_ch, channel(server, rogue) as rogue_ch:
        real_stub = worker_pb2_grpc.WorkerServiceStub(real_ch)
        rogue_stub = worker_pb2_grpc.WorkerServiceStub(rogue_ch)
        # The server assigns ids: a made-up id is not taken over.
        reply = await real_stub.RegisterWorker(register_request("a", worker_id="worker-chosen"))
        worker_id = reply.worker_id
        assert worker_id != "worker-chosen"

        bogus = register_request("evil", worker_id=worker_id)
        bogus.platform.properties[0].value = "Plan9"
        error = await refused(rogue_stub.RegisterWorker(bogus))
        assert error.code() == PERMISSION_DENIED
        for call in (
            rogue_stub.Heartbeat(worker_pb2.HeartbeatRequest(worker_id=worker_id)),
            rogue_stub.PollTasks(worker_pb2.PollTasksRequest(worker_id=worker_id)),
            rogue_stub.CompleteTask(
                worker_pb2.CompleteTaskRequest(worker_id=worker_id, task_id="task-1")
            ),
            rogue_stub.ReleaseTask(
                worker_pb2.ReleaseTaskRequest(worker_id=worker_id, task_id="task-1")
            ),
            rogue_stub.DeregisterWorker(worker_pb2.DeregisterWorkerRequest(worker_id=worker_id)),
        ):
            assert (await refused(call)).code() == PERMISSION_DENIED
        row = await server.pool.fetchrow(
            "SELECT name, platform, state, principal FROM workers WHERE id = $1", worker_id
        )
        assert row["name"] == "a" and "Plan9" not in row["platform"]
        assert row["state"] == "online" and row["principal"] == "worker-a"
        # Its owner re-registers it as before.
        again = await real_stub.RegisterWorker(register_request("a", worker_id=worker_id))
        assert again.worker_id == worker_id


async def test_results_come_only_from_the_worker_holding_the_lease(server):
    """The attack: a rogue worker returned a trojan result for another client's task."""
    client = await make_token(server.pool, "ci", *CLIENT_SCOPES)
    real = await make_token(server.pool, "worker-a", "worker")
    rogue = await make_token(server.pool, "worker-b", "worker")
    digest, blobs = action_blobs(("sh", "-c", "echo genuine"))
    await upload(server, client, blobs)
    async with (
        channel(server, client) as client_ch,
        channel(server, real) as real_ch,
        channel(server, rogue) as rogue_ch,
    ):
        stream = re_grpc.ExecutionStub(client_ch).Execute(
            re_pb2.ExecuteRequest(action_digest=digest.to_proto())
        )
        await stream.read()
        real_stub = worker_pb2_grpc.WorkerServiceStub(real_ch)
        real_id = (await real_stub.RegisterWorker(register_request("a"))).worker_id
        [task] = (
            await real_stub.PollTasks(worker_pb2.PollTasksRequest(worker_id=real_id, max_tasks=1))
        ).tasks
        trojan = re_pb2.ExecuteResponse(result=re_pb2.ActionResult(stdout_raw=b"trojan"))
        rogue_stub = worker_pb2_grpc.WorkerServiceStub(rogue_ch)
        # Claiming to be the leaseholder (its id and lease token) is refused...
        error = await refused(
            rogue_stub.CompleteTask(
                worker_pb2.CompleteTaskRequest(
                    worker_id=real_id,
                    task_id=task.task_id,
                    lease_token=task.lease_token,
                    response=trojan,
                )
            )
        )
        assert error.code() == PERMISSION_DENIED
        # ...and so is polling for it, though the replica now keeps its record (the poll
        # that leased did not end empty).
        poll = rogue_stub.PollTasks(worker_pb2.PollTasksRequest(worker_id=real_id))
        assert (await refused(poll)).code() == PERMISSION_DENIED
        # ...and so is reporting under its own id without the lease.
        rogue_id = (await rogue_stub.RegisterWorker(register_request("b"))).worker_id
        error = await refused(
            rogue_stub.CompleteTask(
                worker_pb2.CompleteTaskRequest(
                    worker_id=rogue_id,
                    task_id=task.task_id,
                    lease_token=task.lease_token,
                    response=trojan,
                )
            )
        )
        assert error.code() == grpc.StatusCode.ABORTED, error.details()
        assert await server.pool.fetchval("SELECT count(*) FROM action_cache") == 0
        stream.cancel()


async def test_action_cache_writes_need_ac_write(server):
    """The attack: UpdateActionResult from a plain client poisoned the cache."""
    client = await make_token(server.pool, "ci", *CLIENT_SCOPES)
    uploader = await make_token(server.pool, "trusted-ci", *CLIENT_SCOPES, "ac:write")
    digest, _ = action_blobs()
    forged = re_pb2.UpdateActionResultRequest(
        action_digest=digest.to_proto(), action_result=re_pb2.ActionResult(exit_code=0)
    )
    async with channel(server, client) as ch:
        error = await refused(re_grpc.ActionCacheStub(ch).UpdateActionResult(forged))
        assert error.code() == PERMISSION_DENIED and "ac:write" in error.details()
    assert await server.pool.fetchval("SELECT count(*) FROM action_cache") == 0
    async with channel(server, uploader) as ch:
        await re_grpc.ActionCacheStub(ch).UpdateActionResult(forged)
        # Even a trusted writer's result is checked: a malformed digest would be served.
        bad = re_pb2.UpdateActionResultRequest()
        bad.CopyFrom(forged)
        bad.action_digest.CopyFrom(action_blobs(("true",))[0].to_proto())
        bad.action_result.output_files.add(path="out", digest=re_pb2.Digest(hash="xyz"))
        error = await refused(re_grpc.ActionCacheStub(ch).UpdateActionResult(bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "action_result.output_files[0].digest" in error.details()
    assert await server.pool.fetchval("SELECT count(*) FROM action_cache") == 1


async def test_operations_belong_to_their_creator(server, tmp_path):
    """The attack: ListOperations showed another client's operation; CancelOperation
    on it ended the victim's stream."""
    victim = await make_token(server.pool, "victim", *CLIENT_SCOPES)
    other = await make_token(server.pool, "other", *CLIENT_SCOPES)
    admin = await make_token(server.pool, "ops", "admin")
    digest, blobs = action_blobs(("sh", "-c", "echo mine"))
    await upload(server, victim, blobs)
    async with channel(server, victim) as victim_ch, channel(server, other) as other_ch:
        stream = re_grpc.ExecutionStub(victim_ch).Execute(
            re_pb2.ExecuteRequest(action_digest=digest.to_proto())
        )
        name = (await stream.read()).name
        ops = operations_pb2_grpc.OperationsStub(other_ch)
        listed = await ops.ListOperations(operations_pb2.ListOperationsRequest())
        assert name not in [op.name for op in listed.operations]
        for call in (
            ops.GetOperation(operations_pb2.GetOperationRequest(name=name)),
            ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name)),
            ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name)),
            re_grpc.ExecutionStub(other_ch).WaitExecution(re_pb2.WaitExecutionRequest(name=name)),
        ):
            error = await refused(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert error.details() == f"operation {name!r} does not exist"

        # The other client joins the same in-flight action with its own operation...
        joined = re_grpc.ExecutionStub(other_ch).Execute(
            re_pb2.ExecuteRequest(action_digest=digest.to_proto())
        )
        joined_name = (await joined.read()).name
        assert joined_name != name
        assert await server.pool.fetchval("SELECT count(DISTINCT task_id) FROM operations") == 1

        # ...the owner and an admin see the victim's operation...
        mine = operations_pb2_grpc.OperationsStub(victim_ch)
        assert (await mine.GetOperation(operations_pb2.GetOperationRequest(name=name))).name == name
        async with channel(server, admin) as admin_ch:
            everyone = await operations_pb2_grpc.OperationsStub(admin_ch).ListOperations(
                operations_pb2.ListOperationsRequest()
            )
            assert {name, joined_name} <= {op.name for op in everyone.operations}

        # ...and both streams finish with the result once a worker runs the shared task.
        worker = await make_token(server.pool, "worker-a", "worker")
        async with running_worker(
            server, tmp_path / "work", token_file=token_file(tmp_path, worker)
        ):
            for call in (stream, joined):
                last = [op async for op in call][-1]
                response = re_pb2.ExecuteResponse()
                last.response.Unpack(response)
                assert response.status.code == 0 and response.result.exit_code == 0


async def test_only_admins_drain_workers(server):
    """The attack: DrainWorker from anyone made a real worker exit."""
    worker = await make_token(server.pool, "worker-a", "worker")
    client = await make_token(server.pool, "ci", *CLIENT_SCOPES)
    admin = await make_token(server.pool, "ops", "admin")
    async with channel(server, worker) as ch:
        worker_id = (
            await worker_pb2_grpc.WorkerServiceStub(ch).RegisterWorker(register_request())
        ).worker_id
    for token in (client, worker):
        async with channel(server, token) as ch:
            admin_stub = worker_pb2_grpc.WorkerAdminServiceStub(ch)
            error = await refused(
                admin_stub.DrainWorker(worker_pb2.DrainWorkerRequest(worker_id=worker_id))
            )
            assert error.code() == PERMISSION_DENIED and "admin" in error.details()
            error = await refused(admin_stub.ListWorkers(worker_pb2.ListWorkersRequest()))
            assert error.code() == PERMISSION_DENIED
    assert await server.pool.fetchval("SELECT state FROM workers WHERE id = $1", worker_id) == (
        "online"
    )
    async with channel(server, admin) as ch:
        reply = await worker_pb2_grpc.WorkerAdminServiceStub(ch).DrainWorker(
            worker_pb2.DrainWorkerRequest(worker_id=worker_id)
        )
        assert reply.worker.state == "draining"


async def test_a_revoked_token_stops_working_within_the_cache_ttl(server):
    secret = await make_token(server.pool, "ci", *CLIENT_SCOPES)
    request = re_pb2.FindMissingBlobsRequest()
    async with channel(server, secret) as ch:
        cas = re_grpc.ContentAddressableStorageStub(ch)
        await cas.FindMissingBlobs(request)  # cached as valid now
        await db_tokens.revoke_token(server.pool, "ci")
        ttl = server.settings.auth.cache_ttl.total_seconds()
        # Generous for a loaded machine; test_the_cache_trusts_... checks the exact bound.
        deadline = time.monotonic() + ttl + 10
        while True:
            try:
                await cas.FindMissingBlobs(request)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == UNAUTHENTICATED and "revoked" in exc.details()
                break
            assert time.monotonic() < deadline, "the revoked token was still accepted"
            await asyncio.sleep(0.05)


async def test_expired_and_malformed_credentials_are_unauthenticated(server):
    past = datetime.now(UTC) - timedelta(seconds=1)
    expired = await make_token(server.pool, "old", *CLIENT_SCOPES, expires_at=past)
    async with channel(server, expired) as ch:
        error = await refused(
            re_grpc.ContentAddressableStorageStub(ch).FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest()
            )
        )
        assert error.code() == UNAUTHENTICATED and "expired" in error.details()
    async with channel(server) as ch:
        error = await refused(
            re_grpc.ContentAddressableStorageStub(ch).FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(), metadata=(("authorization", "Basic dXNlcg=="),)
            )
        )
        assert error.code() == UNAUTHENTICATED and "Bearer" in error.details()


async def test_a_token_limited_to_an_instance_gets_only_that_instance(database_url, tmp_path):
    settings = secured_settings(tmp_path / "cas", instance_names=("", "team-a"))
    async with running_server(settings, database_url) as app:
        secret = await make_token(app.pool, "team-a-ci", *CLIENT_SCOPES, instances=("team-a",))
        async with channel(app, secret) as ch:
            cas = re_grpc.ContentAddressableStorageStub(ch)
            await cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(instance_name="team-a"))
            error = await refused(cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest()))
            assert error.code() == PERMISSION_DENIED and "team-a" in error.details()


async def test_the_client_library_reports_a_missing_token(server):
    with pytest.raises(RemoteError) as caught:
        await run_command(f"127.0.0.1:{server.port}", ["true"])
    assert caught.value.code == code_pb2.UNAUTHENTICATED  # RemoteError carries the google.rpc code
    reader = await make_token(server.pool, "reader", "cas:read")
    with pytest.raises((PermissionDenied, RemoteError)):
        await run_command(
            f"127.0.0.1:{server.port}", ["true"], security=ChannelSecurity(token=reader)
        )


async def test_the_cache_trusts_a_token_for_exactly_cache_ttl(pool):
    """A revocation is seen at the first check after cache_ttl, never before, and costs
    no query per call meanwhile (a clock the test moves; a real database)."""
    from expbuild.auth.verifier import TokenVerifier, Unauthenticated

    now = [1000.0]
    verifier = TokenVerifier(pool, cache_ttl=5.0, clock=lambda: now[0])
    secret = await make_token(pool, "ci", *CLIENT_SCOPES)
    assert (await verifier.verify(secret)).name == "ci"
    await db_tokens.revoke_token(pool, "ci")
    now[0] += 4.9
    assert (await verifier.verify(secret)).name == "ci"  # still cached: no query
    now[0] += 0.2
    with pytest.raises(Unauthenticated, match="revoked"):
        await verifier.verify(secret)
    with pytest.raises(Unauthenticated, match="not known"):
        await verifier.verify("ebt_nope")


@pytest.mark.parametrize(
    ("field", "fill"),
    [
        ("stdout_digest", lambda r: r.stdout_digest.CopyFrom(re_pb2.Digest(hash="0" * 63))),
        ("stderr_digest", lambda r: r.stderr_digest.CopyFrom(re_pb2.Digest(size_bytes=-1))),
        ("output_files[0].digest", lambda r: r.output_files.add(path="o")),
        (
            "output_directories[0].tree_digest",
            lambda r: r.output_directories.add(
                path="d", tree_digest=re_pb2.Digest(hash="Z" * 64, size_bytes=1)
            ),
        ),
    ],
)
async def test_update_action_result_names_a_malformed_digest(server, field, fill):
    uploader = await make_token(server.pool, "trusted-ci", "ac:write")
    digest, _ = action_blobs()
    request = re_pb2.UpdateActionResultRequest(action_digest=digest.to_proto())
    fill(request.action_result)
    async with channel(server, uploader) as ch:
        error = await refused(re_grpc.ActionCacheStub(ch).UpdateActionResult(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"action_result.{field}: ")
    assert await server.pool.fetchval("SELECT count(*) FROM action_cache") == 0
