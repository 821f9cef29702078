"""CompleteTask with blobs inline, and completions coalesced into shared statements.

A real server on real PostgreSQL; the "worker" is a Worker API client driven by the test
(so it can be hostile), except in the last test, where a real worker daemon runs actions.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from expbuild.digest import EMPTY, digest_of
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.proto import worker_pb2, worker_pb2_grpc
from expbuild.scheduling.results import MAX_INLINE_BLOB_BYTES
from tests.serving import running_server, running_worker, server_settings
from tests.test_server_execution import (
    channel_to,
    put_action,
    stage,
    unpack_response,
    wait_until,
)


@pytest.fixture
async def server(database_url, tmp_path):
    async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
        yield app


async def register(stub, slots: int = 2) -> str:
    request = worker_pb2.RegisterWorkerRequest(name="w", max_concurrent_tasks=slots)
    request.platform.properties.add(name="OSFamily", value="Linux")
    reply = await stub.RegisterWorker(request)
    assert reply.max_inline_blob_bytes == MAX_INLINE_BLOB_BYTES
    return reply.worker_id


async def execute_and_lease(server, execution, workers, worker_id, argv=("true",)):
    """An Execute stream (past QUEUED) and the task the worker leased for it."""
    digest = await put_action(server.store, argv)
    stream = execution.Execute(
        re_pb2.ExecuteRequest(action_digest=digest.to_proto(), skip_cache_lookup=True)
    )
    while stage(await stream.read()) != re_pb2.ExecutionStage.QUEUED:
        pass
    [task] = (
        await workers.PollTasks(worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=1))
    ).tasks
    return digest, stream, task


async def final_operation(stream):
    """The stream's last Operation (read, not iterated: the stream was read before)."""
    while not (operation := await stream.read()).done:
        pass
    return operation


def blob(data: bytes) -> worker_pb2.InlineBlob:
    return worker_pb2.InlineBlob(digest=digest_of(data).to_proto(), data=data)


def response_naming(stdout: bytes = b"", files: dict[str, bytes] | None = None, **extra):
    result = re_pb2.ActionResult(
        exit_code=0, stdout_digest=digest_of(stdout).to_proto(), stderr_digest=EMPTY.to_proto()
    )
    for path, data in (files or {}).items():
        result.output_files.add(path=path, digest=digest_of(data).to_proto())
    for path, tree in extra.get("trees", {}).items():
        result.output_directories.add(path=path, tree_digest=digest_of(tree).to_proto())
    response = re_pb2.ExecuteResponse(result=result, status=status_pb2.Status(code=code_pb2.OK))
    if "log" in extra:
        response.server_logs["worker.log"].digest.CopyFrom(digest_of(extra["log"]).to_proto())
    return response


def complete_request(worker_id, task, response, inline=()):
    return worker_pb2.CompleteTaskRequest(
        worker_id=worker_id,
        task_id=task.task_id,
        lease_token=task.lease_token,
        response=response,
        inline_blobs=list(inline),
    )


async def task_state(server, task) -> str:
    return await server.pool.fetchval(
        "SELECT state FROM tasks WHERE id = $1", int(task.task_id.removeprefix("task-"))
    )


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_inline_blobs_reach_the_cas_and_the_result_then_serves_cache_hits(server):
    stdout, output, inside, log = b"hello\n", b"an output file", b"in a directory", b"log"
    tree = re_pb2.Tree(
        root=re_pb2.Directory(
            files=[re_pb2.FileNode(name="f", digest=digest_of(inside).to_proto())]
        )
    ).SerializeToString()
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        worker_id = await register(workers)
        digest, stream, task = await execute_and_lease(server, execution, workers, worker_id)
        response = response_naming(stdout, {"out": output}, trees={"dir": tree}, log=log)
        inline = [blob(d) for d in (stdout, output, inside, tree, log)]
        await workers.CompleteTask(complete_request(worker_id, task, response, inline))

        final = await final_operation(stream)
        assert final.done and unpack_response(final).result.output_files[0].path == "out"
        for data in (stdout, output, inside, tree, log):
            assert await server.store.get(digest_of(data)) == data
        # Complete in the CAS, so the action cache entry is a hit.
        again = [
            op
            async for op in execution.Execute(
                re_pb2.ExecuteRequest(action_digest=digest.to_proto())
            )
        ]
        assert unpack_response(again[-1]).cached_result


async def test_an_inline_blob_not_matching_its_digest_is_refused_and_nothing_is_written(server):
    stdout, output = b"good\n", b"the real bytes"
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        worker_id = await register(workers)
        _, stream, task = await execute_and_lease(server, execution, workers, worker_id)
        response = response_naming(stdout, {"out": output})
        forged = worker_pb2.InlineBlob(digest=digest_of(output).to_proto(), data=b"X" * len(output))
        error = await refused(
            workers.CompleteTask(
                complete_request(worker_id, task, response, [blob(stdout), forged])
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"inline blob {digest_of(output)}" in error.details()
        assert not await server.store.has(digest_of(stdout))  # the good one neither
        assert await task_state(server, task) == "leased"

        # The same lease, reported honestly, is accepted.
        await workers.CompleteTask(
            complete_request(worker_id, task, response, [blob(stdout), blob(output)])
        )
        assert (await final_operation(stream)).done
        assert await server.store.get(digest_of(output)) == output


async def test_inline_blobs_over_the_budget_or_of_the_wrong_size_are_refused(server):
    big = [bytes([n]) * (MAX_INLINE_BLOB_BYTES // 2 + 1) for n in range(2)]
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        worker_id = await register(workers)
        _, _, task = await execute_and_lease(server, execution, workers, worker_id)
        response = response_naming(files={"a": big[0], "b": big[1]})
        error = await refused(
            workers.CompleteTask(complete_request(worker_id, task, response, map(blob, big)))
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"exceed {MAX_INLINE_BLOB_BYTES} bytes" in error.details()
        assert f"inline blob {digest_of(big[1])}" in error.details()
        for data in big:
            assert not await server.store.has(digest_of(data))

        short = worker_pb2.InlineBlob(digest=digest_of(b"four").to_proto(), data=b"for")
        error = await refused(
            workers.CompleteTask(
                complete_request(worker_id, task, response_naming(files={"x": b"four"}), [short])
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inline_blobs[0]" in error.details() and "has 3 bytes" in error.details()
        assert await task_state(server, task) == "leased"


async def test_a_result_naming_a_blob_neither_inline_nor_in_the_cas_is_refused(server):
    absent = b"never sent anywhere"
    tree = re_pb2.Tree(
        root=re_pb2.Directory(
            files=[re_pb2.FileNode(name="f", digest=digest_of(absent).to_proto())]
        )
    ).SerializeToString()
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        worker_id = await register(workers)
        _, _, task = await execute_and_lease(server, execution, workers, worker_id)

        # The Tree comes inline, a file inside it nowhere: MISSING names that file.
        response = response_naming(b"out\n", trees={"dir": tree})
        error = await refused(
            workers.CompleteTask(
                complete_request(worker_id, task, response, [blob(b"out\n"), blob(tree)])
            )
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = dict(error.trailing_metadata())["grpc-status-details-bin"]
        failure = error_details_pb2.PreconditionFailure()
        status_pb2.Status.FromString(details).details[0].Unpack(failure)
        missing = digest_of(absent)
        assert [(v.type, v.subject) for v in failure.violations] == [
            ("MISSING", f"blobs/{missing.hash}/{missing.size_bytes}")
        ]
        assert not await server.store.has(digest_of(tree))
        assert await task_state(server, task) == "leased"

        # An inline blob the result does not name is no way to write to the CAS.
        error = await refused(
            workers.CompleteTask(
                complete_request(worker_id, task, response_naming(), [blob(b"stowaway")])
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "named by nothing" in error.details()
        assert not await server.store.has(digest_of(b"stowaway"))
        assert await task_state(server, task) == "leased"


async def test_a_worker_sending_nothing_inline_uploads_first_as_before(server):
    stdout = b"uploaded the old way\n"
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        cas = re_grpc.ContentAddressableStorageStub(channel)
        worker_id = await register(workers)
        _, stream, task = await execute_and_lease(server, execution, workers, worker_id)
        early = await refused(
            workers.CompleteTask(complete_request(worker_id, task, response_naming(stdout)))
        )
        assert early.code() == grpc.StatusCode.FAILED_PRECONDITION  # not uploaded yet
        uploaded = await cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(
                        digest=digest_of(stdout).to_proto(), data=stdout
                    )
                ]
            )
        )
        assert uploaded.responses[0].status.code == code_pb2.OK
        await workers.CompleteTask(complete_request(worker_id, task, response_naming(stdout)))
        final = unpack_response(await final_operation(stream))
        assert final.result.stdout_digest == digest_of(stdout).to_proto()


async def test_concurrent_completions_share_one_statement_and_a_stale_one_fails_alone(
    server, database_url
):
    count = 8
    batcher = server.worker_api.completions
    async with channel_to(server) as channel:
        execution = re_grpc.ExecutionStub(channel)
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        worker_id = await register(workers, slots=count + 1)
        leased = [
            await execute_and_lease(server, execution, workers, worker_id, ("true", str(n)))
            for n in range(count + 1)
        ]
        tasks = [task for _, _, task in leased]
        ids = [int(t.task_id.removeprefix("task-")) for t in tasks]
        stale = tasks[-1]
        await workers.ReleaseTask(
            worker_pb2.ReleaseTaskRequest(
                worker_id=worker_id, task_id=stale.task_id, lease_token=stale.lease_token
            )
        )

        # The first completion's statement waits on a row lock held here, so the others
        # arrive while it is in flight.
        holder = await asyncpg.connect(database_url)
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", ids[0])
        first = asyncio.ensure_future(
            workers.CompleteTask(complete_request(worker_id, tasks[0], response_naming()))
        )
        await wait_until(lambda: batcher.statements == 1, what="the first statement sent")
        rest = [
            asyncio.ensure_future(
                workers.CompleteTask(complete_request(worker_id, task, response_naming()))
            )
            for task in tasks[1:]
        ]
        await wait_until(lambda: batcher.waiting == count, what="every other completion queued")
        await lock.commit()
        await holder.close()

        await first
        outcomes = await asyncio.gather(*rest, return_exceptions=True)
        assert outcomes[:-1] == [worker_pb2.CompleteTaskResponse()] * (count - 1)
        assert isinstance(outcomes[-1], grpc.aio.AioRpcError)
        assert outcomes[-1].code() == grpc.StatusCode.ABORTED
        assert "queued again" in outcomes[-1].details()
        assert batcher.statements == 2

        # One commit for all of the second batch: the rows share their transaction id.
        xids = await server.pool.fetch(
            "SELECT id, xmin::text AS x FROM tasks WHERE id = ANY($1)", ids
        )
        by_id = {r["id"]: r["x"] for r in xids}
        assert len({by_id[i] for i in ids[1:-1]}) == 1 and by_id[ids[0]] != by_id[ids[1]]
        # Each its own audit row, and each waiting client woken by its own NOTIFY.
        for task_id in ids[:-1]:
            events = await server.pool.fetch(
                "SELECT event FROM task_events WHERE task_id = $1 ORDER BY id", task_id
            )
            assert [e["event"] for e in events] == ["queued", "leased", "completed"]
        for _, stream, _ in leased[:-1]:
            assert (await final_operation(stream)).done
        assert await task_state(server, stale) == "queued"


async def test_a_real_worker_sends_small_blobs_inline_and_uploads_large_ones(
    server, tmp_path, caplog
):
    big = MAX_INLINE_BLOB_BYTES + 1
    argv = (
        "sh",
        "-c",
        f"echo small > small; head -c {big} /dev/zero > big; echo out; echo err >&2",
    )
    command = re_pb2.Command(arguments=argv, output_paths=["small", "big"])
    root = re_pb2.Directory().SerializeToString()
    action = re_pb2.Action(
        command_digest=digest_of(command.SerializeToString()).to_proto(),
        input_root_digest=digest_of(root).to_proto(),
    ).SerializeToString()
    for data in (command.SerializeToString(), root, action):
        await server.store.put(digest_of(data), data)
    with caplog.at_level(logging.INFO, logger="expbuild.worker.runner"):
        async with running_worker(server, tmp_path / "work"), channel_to(server) as channel:
            execution = re_grpc.ExecutionStub(channel)
            ops = [
                op
                async for op in execution.Execute(
                    re_pb2.ExecuteRequest(action_digest=digest_of(action).to_proto())
                )
            ]
    result = unpack_response(ops[-1]).result
    assert result.exit_code == 0
    files = {f.path: f.digest for f in result.output_files}
    assert await server.store.get(digest_of(b"small\n")) == b"small\n"
    assert files["small"] == digest_of(b"small\n").to_proto()
    assert (await server.store.get(digest_of(b"\0" * big))) == b"\0" * big
    assert await server.store.get(digest_of(b"out\n")) == b"out\n"
    assert await server.store.get(digest_of(b"err\n")) == b"err\n"
    # small, stdout, stderr and the log went inline; only the big file was uploaded.
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Outputs:")]
    assert line.startswith("Outputs: 4 blob(s) inline") and "1 uploaded" in line
