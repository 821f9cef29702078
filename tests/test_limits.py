"""Limits instead of collapse (issue #9.7): a cap on queued tasks, a full CAS disk and a
full worker disk each answer RESOURCE_EXHAUSTED, and everything else keeps working."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2

from expbuild.client.cas import CasClient
from expbuild.digest import digest_of
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from tests.serving import running_server, running_worker, server_settings
from tests.test_server_execution import channel_to, put_action, stage, unpack_response

Stage = re_pb2.ExecutionStage


@contextlib.contextmanager
def tiny_disk(path: Path, size: str):
    """A tmpfs of `size` at `path` (the tests run as root); skipped where mounting is barred."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace')}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


async def test_execute_is_refused_while_the_queue_is_full(database_url, tmp_path):
    settings = server_settings(tmp_path / "cas", max_queued_tasks=2)
    async with running_server(settings, database_url) as app:
        digests = [await put_action(app.store, ("echo", str(n))) for n in range(3)]
        async with channel_to(app) as channel:
            execution = re_grpc.ExecutionStub(channel)
            streams = []
            for digest in digests[:2]:
                stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))
                while stage(await stream.read()) != Stage.QUEUED:
                    pass
                streams.append(stream)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await execution.Execute(
                    re_pb2.ExecuteRequest(action_digest=digests[2].to_proto())
                ).read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queued_tasks" in info.value.details()
            assert await app.pool.fetchval("SELECT count(*) FROM tasks") == 2
            # Room again once one leaves the queue.
            await app.pool.execute(
                "UPDATE tasks SET state = 'cancelled' WHERE id = (SELECT min(id) FROM tasks)"
            )
            stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=digests[2].to_proto()))
            assert stage(await stream.read()) == Stage.CACHE_CHECK
            for each in [*streams, stream]:
                each.cancel()


async def test_a_full_cas_disk_answers_resource_exhausted_and_reads_go_on(database_url, tmp_path):
    with tiny_disk(tmp_path / "cas", "1m") as cas_root:
        async with running_server(server_settings(cas_root), database_url) as app:
            small = b"kept before the disk filled"
            big = b"x" * (1536 * 1024)
            async with channel_to(app) as channel:
                cas = re_grpc.ContentAddressableStorageStub(channel)

                def update(data: bytes):
                    return cas.BatchUpdateBlobs(
                        re_pb2.BatchUpdateBlobsRequest(
                            requests=[
                                re_pb2.BatchUpdateBlobsRequest.Request(
                                    digest=digest_of(data).to_proto(), data=data
                                )
                            ]
                        )
                    )

                assert (await update(small)).responses[0].status.code == code_pb2.OK
                reply = await update(big)
                assert reply.responses[0].status.code == code_pb2.RESOURCE_EXHAUSTED
                digest = digest_of(big)
                name = f"uploads/{'0' * 8}-0000-0000-0000-{'0' * 12}/blobs/{digest.hash}/{digest.size_bytes}"

                async def chunks():
                    for offset in range(0, len(big), 256 * 1024):
                        piece = big[offset : offset + 256 * 1024]
                        yield bytestream_pb2.WriteRequest(
                            resource_name=name if offset == 0 else "",
                            write_offset=offset,
                            data=piece,
                            finish_write=offset + len(piece) == len(big),
                        )

                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await bytestream_pb2_grpc.ByteStreamStub(channel).Write(chunks())
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert not await app.store.has(digest)  # nothing half-written is visible
                blobs = [p for p in (cas_root / "sha256").rglob("*") if p.is_file()]
                assert [p.name for p in blobs] == [digest_of(small).hash]
                # Reads are still served.
                assert await CasClient(channel).read(digest_of(small)) == small


async def test_a_full_worker_disk_fails_that_action_and_the_worker_goes_on(database_url, tmp_path):
    big_input = b"y" * (2 * 1024 * 1024)
    with tiny_disk(tmp_path / "work", "1m") as work_dir:
        async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
            store = app.store
            command = re_pb2.Command(arguments=["cat", "big"])
            root = re_pb2.Directory(
                files=[re_pb2.FileNode(name="big", digest=digest_of(big_input).to_proto())]
            )
            await store.put(digest_of(big_input), big_input)
            for message in (command, root):
                await store.put(digest_of(message.SerializeToString()), message.SerializeToString())
            action = re_pb2.Action(
                command_digest=digest_of(command.SerializeToString()).to_proto(),
                input_root_digest=digest_of(root.SerializeToString()).to_proto(),
                do_not_cache=True,
            )
            action_digest = digest_of(action.SerializeToString())
            await store.put(action_digest, action.SerializeToString())
            small = await put_action(store, ("echo", "still working"), do_not_cache=True)
            async with running_worker(app, work_dir), channel_to(app) as channel:
                execution = re_grpc.ExecutionStub(channel)
                failed = await _final(execution, action_digest)
                assert failed.status.code == code_pb2.RESOURCE_EXHAUSTED
                assert "disk is full" in failed.status.message
                worked = await _final(execution, small)
                assert worked.status.code == code_pb2.OK and worked.result.exit_code == 0


async def _final(execution, digest) -> re_pb2.ExecuteResponse:
    stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto()))

    async def last():
        operation = await stream.read()
        while not operation.done:
            operation = await stream.read()
        return operation

    return unpack_response(await asyncio.wait_for(last(), timeout=60))
