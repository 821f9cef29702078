"""REAPI execution semantics end to end: real server, real Postgres, a real WorkerAgent.

Stages, cancellation of queued and running actions, ListOperations, priority order,
timeouts and their maximum, unsatisfiable platforms, action cache completeness and
inlining, and the Operations service's error paths.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2

from expbuild.client.actions import build_action, build_command
from expbuild.client.cas import CasClient
from expbuild.client.channel import open_channel
from expbuild.digest import Digest, digest_of
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.reapi.merkle import serialize
from tests.serving import running_server, running_worker, server_settings
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e
Stage = re_pb2.ExecutionStage


@pytest.fixture
async def server(database_url, tmp_path):
    settings = server_settings(
        tmp_path / "cas",
        heartbeat_interval=timedelta(seconds=0.3),
        lease_duration=timedelta(seconds=10),
        max_action_timeout=timedelta(seconds=30),
    )
    async with running_server(settings, database_url) as app:
        yield app


def worker_running(server, tmp_path, *, slots=2, platform=None, name="w"):
    return running_worker(
        server,
        tmp_path / f"work-{name}",
        name=name,
        slots=slots,
        heartbeat_interval=timedelta(seconds=0.3),
        platform=platform or {},
    )


async def upload_action(
    channel, argv, *, timeout=None, do_not_cache=False, platform=None, outputs=()
) -> Digest:
    cas = CasClient(channel)
    command = build_command(argv, output_paths=outputs, platform=platform)
    root = re_pb2.Directory()
    action = build_action(
        digest_of(serialize(command)),
        digest_of(serialize(root)),
        timeout=timeout,
        do_not_cache=do_not_cache,
        platform=platform,
    )
    blobs = {digest_of(serialize(m)): serialize(m) for m in (command, root, action)}
    await cas.upload(blobs)
    return digest_of(serialize(action))


def metadata(operation) -> re_pb2.ExecuteOperationMetadata:
    meta = re_pb2.ExecuteOperationMetadata()
    operation.metadata.Unpack(meta)
    return meta


def response(operation) -> re_pb2.ExecuteResponse:
    reply = re_pb2.ExecuteResponse()
    operation.response.Unpack(reply)
    return reply


async def read_until(call, stage: int):
    """Read the Execute stream up to the first operation at `stage`."""
    while True:
        operation = await call.read()
        assert operation is not grpc.aio.EOF, f"the stream ended before stage {stage}"
        if metadata(operation).stage == stage:
            return operation


async def all_operations(call) -> list:
    found = []
    while (op := await call.read()) is not grpc.aio.EOF:
        found.append(op)
    return found


async def test_stages_run_from_cache_check_to_completed_and_cache_hits_say_so(
    server, channel, tmp_path
):
    digest = await upload_action(channel, ["sh", "-c", "echo out; echo err >&2"])
    execution = re_grpc.ExecutionStub(channel)
    async with worker_running(server, tmp_path):
        ops = await all_operations(
            execution.Execute(
                re_pb2.ExecuteRequest(
                    action_digest=digest.to_proto(), inline_stdout=True, inline_stderr=True
                )
            )
        )
    stages = [metadata(op).stage for op in ops]
    assert stages[0] == Stage.CACHE_CHECK and stages[-1] == Stage.COMPLETED
    assert Stage.QUEUED in stages
    assert stages.index(Stage.CACHE_CHECK) < stages.index(Stage.QUEUED)
    first = response(ops[-1])
    assert not first.cached_result and first.result.stdout_raw == b"out\n"
    assert first.result.stderr_raw == b"err\n"
    assert first.result.execution_metadata.worker

    hit = await all_operations(
        execution.Execute(
            re_pb2.ExecuteRequest(action_digest=digest.to_proto(), inline_stdout=True)
        )
    )
    assert [metadata(op).stage for op in hit] == [Stage.CACHE_CHECK, Stage.COMPLETED]
    cached = response(hit[-1])
    assert cached.cached_result and cached.result.stdout_raw == b"out\n"
    assert not cached.result.stderr_raw  # not asked for


async def test_cache_entry_whose_outputs_left_the_cas_is_a_miss(server, channel, tmp_path):
    digest = await upload_action(channel, ["sh", "-c", "echo unique-output-1234"])
    execution = re_grpc.ExecutionStub(channel)
    cache = re_grpc.ActionCacheStub(channel)
    async with worker_running(server, tmp_path):
        await all_operations(
            execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
        )
        result = await cache.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=digest.to_proto(), inline_stdout=True)
        )
        assert result.stdout_raw == b"unique-output-1234\n"
        stdout = digest_of(b"unique-output-1234\n")
        server.store.path_of(stdout).unlink()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await cache.GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=digest.to_proto())
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        again = await all_operations(
            execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
        )
        assert not response(again[-1]).cached_result  # ran again, outputs back in the CAS
    assert await server.store.has(stdout)


async def test_update_action_result_checks_outputs_and_can_be_switched_off(database_url, tmp_path):
    settings = server_settings(tmp_path / "cas")
    async with running_server(settings, database_url) as app:
        async with open_channel(f"127.0.0.1:{app.port}") as channel:
            cache = re_grpc.ActionCacheStub(channel)
            action = digest_of(b"some action")
            missing = re_pb2.ActionResult(stdout_digest=digest_of(b"never uploaded").to_proto())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cache.UpdateActionResult(
                    re_pb2.UpdateActionResultRequest(
                        action_digest=action.to_proto(), action_result=missing
                    )
                )
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            # A tree_digest naming a blob that is no Tree: its outputs cannot be read back.
            await app.store.put(digest_of(b"not a tree"), b"not a tree")
            not_a_tree = re_pb2.ActionResult()
            not_a_tree.output_directories.add(
                path="out", tree_digest=digest_of(b"not a tree").to_proto()
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cache.UpdateActionResult(
                    re_pb2.UpdateActionResultRequest(
                        action_digest=action.to_proto(), action_result=not_a_tree
                    )
                )
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
            await app.store.put(digest_of(b"hello"), b"hello")
            good = re_pb2.ActionResult(exit_code=0, stdout_digest=digest_of(b"hello").to_proto())
            await cache.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    action_digest=action.to_proto(), action_result=good
                )
            )
            got = await cache.GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=action.to_proto())
            )
            assert got.stdout_digest.hash == digest_of(b"hello").hash
    closed = replace(settings, server=replace(settings.server, allow_action_cache_updates=False))
    async with running_server(closed, database_url) as app:
        async with open_channel(f"127.0.0.1:{app.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await re_grpc.ActionCacheStub(channel).UpdateActionResult(
                    re_pb2.UpdateActionResultRequest(
                        action_digest=action.to_proto(), action_result=good
                    )
                )
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("field", ["stdout", "stderr", "output_file"])
async def test_update_action_result_refuses_inlined_bytes_that_lie(server, channel, field):
    # The blob is in the CAS; the bytes inlined beside its digest are other bytes.
    await server.store.put(digest_of(b"hello"), b"hello")
    hello = digest_of(b"hello").to_proto()
    result = re_pb2.ActionResult()
    if field == "output_file":
        result.output_files.add(path="out", digest=hello, contents=b"HELLO")
    else:
        getattr(result, f"{field}_digest").CopyFrom(hello)
        setattr(result, f"{field}_raw", b"HELLO")
    cache = re_grpc.ActionCacheStub(channel)
    action = digest_of(f"inlined {field}".encode()).to_proto()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cache.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inlined bytes" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cache.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was stored
    # The same result with the true bytes inlined is accepted.
    if field == "output_file":
        result.output_files[0].contents = b"hello"
    else:
        setattr(result, f"{field}_raw", b"hello")
    await cache.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result)
    )


async def test_cancel_a_queued_action(server, channel):
    digest = await upload_action(channel, ["true"], do_not_cache=True)
    call = re_grpc.ExecutionStub(channel).Execute(
        re_pb2.ExecuteRequest(action_digest=digest.to_proto())
    )
    first = await read_until(call, Stage.QUEUED)
    operations = operations_pb2_grpc.OperationsStub(channel)
    await operations.CancelOperation(operations_pb2.CancelOperationRequest(name=first.name))
    last = (await all_operations(call))[-1]
    assert last.done and response(last).status.code == code_pb2.CANCELLED
    state = await server.pool.fetchval("SELECT state FROM tasks")
    assert state == "cancelled"


async def test_cancel_a_running_action_kills_it_on_its_worker(server, channel, tmp_path):
    marker = tmp_path / "still-running"
    digest = await upload_action(
        channel, ["sh", "-c", f"sleep 30; touch {marker}"], do_not_cache=True
    )
    async with worker_running(server, tmp_path) as agent:
        call = re_grpc.ExecutionStub(channel).Execute(
            re_pb2.ExecuteRequest(action_digest=digest.to_proto())
        )
        op = await read_until(call, Stage.EXECUTING)
        assert metadata(op).partial_execution_metadata.worker == agent.name
        await operations_pb2_grpc.OperationsStub(channel).CancelOperation(
            operations_pb2.CancelOperationRequest(name=op.name)
        )
        last = (await all_operations(call))[-1]
        assert response(last).status.code == code_pb2.CANCELLED

        async def stopped():
            return not agent.running_task_ids

        await wait_until(stopped, timeout=10)
    events = [
        r["event"] for r in await server.pool.fetch("SELECT event FROM task_events ORDER BY id")
    ]
    assert events == ["queued", "leased", "cancelled"]
    assert not marker.exists()


async def test_cancelling_one_of_two_merged_operations_keeps_the_task(server, channel):
    digest = await upload_action(channel, ["true"])
    execution = re_grpc.ExecutionStub(channel)
    calls = [
        execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto())) for _ in range(2)
    ]
    names = []
    for call in calls:
        op = await read_until(call, Stage.QUEUED)
        names.append(op.name)
    await operations_pb2_grpc.OperationsStub(channel).CancelOperation(
        operations_pb2.CancelOperationRequest(name=names[0])
    )
    assert response((await all_operations(calls[0]))[-1]).status.code == code_pb2.CANCELLED
    assert await server.pool.fetchval("SELECT state FROM tasks") == "queued"
    calls[1].cancel()


async def test_list_operations_filters_by_state_and_pages(server, channel):
    execution = re_grpc.ExecutionStub(channel)
    calls = []
    for n in range(3):
        digest = await upload_action(channel, ["echo", str(n)])
        call = execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
        await read_until(call, Stage.QUEUED)
        calls.append(call)
    ops = operations_pb2_grpc.OperationsStub(channel)
    queued = await ops.ListOperations(operations_pb2.ListOperationsRequest(filter="state=queued"))
    assert len(queued.operations) == 3
    assert all(metadata(o).stage == Stage.QUEUED for o in queued.operations)
    done = await ops.ListOperations(operations_pb2.ListOperationsRequest(filter="state=completed"))
    assert len(done.operations) == 0
    page = await ops.ListOperations(operations_pb2.ListOperationsRequest(page_size=2))
    assert len(page.operations) == 2 and page.next_page_token
    rest = await ops.ListOperations(
        operations_pb2.ListOperationsRequest(page_size=2, page_token=page.next_page_token)
    )
    assert len(rest.operations) == 1
    assert {o.name for o in [*page.operations, *rest.operations]} == {
        o.name for o in queued.operations
    }
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ops.ListOperations(operations_pb2.ListOperationsRequest(filter="colour=blue"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for name in (o.name for o in queued.operations):
        await ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ops.GetOperation(operations_pb2.GetOperationRequest(name=queued.operations[0].name))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    for call in calls:
        call.cancel()


async def test_lower_priority_value_runs_first(server, channel, tmp_path):
    log = tmp_path / "order.log"
    execution = re_grpc.ExecutionStub(channel)
    calls = []
    for name, priority in [("late", 10), ("early", -5), ("middle", 0)]:
        digest = await upload_action(
            channel, ["sh", "-c", f"echo {name} >> {log}"], do_not_cache=True
        )
        request = re_pb2.ExecuteRequest(action_digest=digest.to_proto())
        request.execution_policy.priority = priority
        call = execution.Execute(request)
        await read_until(call, Stage.QUEUED)
        calls.append(call)
    async with worker_running(server, tmp_path, slots=1):
        for call in calls:
            await all_operations(call)
    assert log.read_text().split() == ["early", "middle", "late"]


async def test_timeout_kills_the_action_and_reports_deadline_exceeded(server, channel, tmp_path):
    digest = await upload_action(
        channel,
        ["sh", "-c", "echo started; sleep 30"],
        timeout=timedelta(seconds=1),
        do_not_cache=True,
    )
    started = time.monotonic()
    async with worker_running(server, tmp_path):
        ops = await all_operations(
            re_grpc.ExecutionStub(channel).Execute(
                re_pb2.ExecuteRequest(action_digest=digest.to_proto(), inline_stdout=True)
            )
        )
    reply = response(ops[-1])
    assert reply.status.code == code_pb2.DEADLINE_EXCEEDED
    assert reply.result.stdout_raw == b"started\n"
    assert time.monotonic() - started < 15


async def test_timeout_over_the_maximum_is_refused(server, channel):
    digest = await upload_action(channel, ["true"], timeout=timedelta(hours=2))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await all_operations(
            re_grpc.ExecutionStub(channel).Execute(
                re_pb2.ExecuteRequest(action_digest=digest.to_proto())
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_action_timeout" in info.value.details()


async def test_a_platform_no_online_worker_offers_fails_fast(server, channel, tmp_path):
    async with worker_running(server, tmp_path, platform={"OSFamily": ("Linux",)}):
        digest = await upload_action(channel, ["true"], platform={"OSFamily": ["Windows"]})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await all_operations(
                re_grpc.ExecutionStub(channel).Execute(
                    re_pb2.ExecuteRequest(action_digest=digest.to_proto())
                )
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # OSFamily is named in the REAPI lexicon's spelling.
        assert '"OSFamily": ["windows"]' in info.value.details()
        # The worker's `Linux` is read as the lexicon's `linux`, and an action asking
        # either spelling (BuildStream's `linux`, a Bazel platform's `Linux`) runs on it.
        for spelling in ("Linux", "linux"):
            asking = await upload_action(channel, ["true"], platform={"OSFamily": [spelling]})
            ops = await all_operations(
                re_grpc.ExecutionStub(channel).Execute(
                    re_pb2.ExecuteRequest(action_digest=asking.to_proto())
                )
            )
            assert response(ops[-1]).result.exit_code == 0, spelling


async def test_empty_platform_property_name_is_invalid(server, channel):
    command = re_pb2.Command(arguments=["true"])
    command.platform.properties.add(name="", value="x")
    root = re_pb2.Directory()
    action = re_pb2.Action(
        command_digest=digest_of(serialize(command)).to_proto(),
        input_root_digest=digest_of(serialize(root)).to_proto(),
    )
    await CasClient(channel).upload(
        {digest_of(serialize(m)): serialize(m) for m in (command, root, action)}
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await all_operations(
            re_grpc.ExecutionStub(channel).Execute(
                re_pb2.ExecuteRequest(action_digest=digest_of(serialize(action)).to_proto())
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty name" in info.value.details()


async def test_unknown_instance_is_named(server, channel):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await all_operations(
            re_grpc.ExecutionStub(channel).Execute(
                re_pb2.ExecuteRequest(
                    instance_name="nope", action_digest=digest_of(b"x").to_proto()
                )
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'nope'" in info.value.details()


async def test_wait_execution_on_another_replica(server, database_url, channel, tmp_path):
    digest = await upload_action(channel, ["echo", "waited"], do_not_cache=True)
    call = re_grpc.ExecutionStub(channel).Execute(
        re_pb2.ExecuteRequest(action_digest=digest.to_proto())
    )
    op = await read_until(call, Stage.QUEUED)
    call.cancel()
    async with running_server(server.settings, database_url) as other:
        async with open_channel(f"127.0.0.1:{other.port}") as other_channel:
            waiting = re_grpc.ExecutionStub(other_channel).WaitExecution(
                re_pb2.WaitExecutionRequest(name=op.name)
            )
            async with worker_running(server, tmp_path):
                ops = await all_operations(waiting)
    assert ops[-1].done and response(ops[-1]).result.exit_code == 0
