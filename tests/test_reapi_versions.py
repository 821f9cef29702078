"""Each REAPI version's additions, 2.0 to 2.12, through our own client against a real
server, real Postgres and a real worker (docs/reapi-versions.md names them).

The server advertises low 2.0 / high 2.12; an old client's messages (v2.0 output_files,
the platform on the Command only) keep working beside the new ones.
"""

from __future__ import annotations

import stat
from datetime import timedelta

import grpc
import pytest
from google.rpc import code_pb2

from expbuild.client.actions import build_action, build_command
from expbuild.client.cas import CasClient
from expbuild.client.tree import serialize
from expbuild.digest import Digest, digest_of
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.reapi.compression import zstd_compressor
from tests.serving import running_server, running_worker, server_settings

pytestmark = pytest.mark.e2e
SHA256 = re_pb2.DigestFunction.SHA256
BLAKE3 = re_pb2.DigestFunction.BLAKE3


@pytest.fixture
async def server(database_url, tmp_path):
    settings = server_settings(tmp_path / "cas", max_action_timeout=timedelta(seconds=60))
    async with running_server(settings, database_url) as app:
        yield app


@pytest.fixture
async def worker(server, tmp_path):
    async with running_worker(server, tmp_path / "work") as agent:
        yield agent


async def run(channel, command: re_pb2.Command, action_platform=None, **request_fields):
    """Upload and execute; returns the final ExecuteResponse and every operation's metadata."""
    root = re_pb2.Directory()
    action = build_action(
        digest_of(serialize(command)), digest_of(serialize(root)), do_not_cache=True
    )
    if action_platform is not None:
        action.platform.CopyFrom(action_platform)
    blobs = {digest_of(serialize(m)): serialize(m) for m in (command, root, action)}
    await CasClient(channel).upload(blobs)
    stub = re_grpc.ExecutionStub(channel)
    request = re_pb2.ExecuteRequest(action_digest=digest_of(serialize(action)).to_proto())
    for name, value in request_fields.items():
        field = getattr(request, name)
        field.extend(value) if isinstance(value, list) else setattr(request, name, value)
    metadata, last = [], None
    async for operation in stub.Execute(request):
        meta = re_pb2.ExecuteOperationMetadata()
        operation.metadata.Unpack(meta)
        metadata.append(meta)
        last = operation
    response = re_pb2.ExecuteResponse()
    last.response.Unpack(response)
    return response, metadata


async def test_capabilities_advertise_2_0_to_2_12(channel):
    caps = await re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest())
    assert (caps.low_api_version.major, caps.low_api_version.minor) == (2, 0)
    assert (caps.high_api_version.major, caps.high_api_version.minor) == (2, 12)
    assert list(caps.execution_capabilities.digest_functions) == [SHA256]  # 2.5
    assert caps.cache_capabilities.split_blob_support  # 2.12
    assert caps.cache_capabilities.splice_blob_support


async def test_v2_0_output_files_and_command_platform(channel, worker):
    """A v2.0 client: output_files, the platform on the Command only."""
    command = re_pb2.Command(arguments=["sh", "-c", "echo old > f.txt"], output_files=["f.txt"])
    command.platform.properties.add(name="OSFamily", value="Linux")
    response, _ = await run(channel, command)
    assert response.status.code == code_pb2.OK, response.status
    [output] = response.result.output_files
    assert output.path == "f.txt"
    assert await CasClient(channel).read(Digest.from_proto(output.digest)) == b"old\n"


async def test_v2_1_output_paths_and_output_node_properties(channel, worker):
    command = build_command(
        ["sh", "-c", "mkdir d && echo x > d/f && chmod 640 d/f && echo y > top && ln -s top l"],
        output_paths=["d", "l", "top"],
    )
    command.output_node_properties.extend(["mtime", "unix_mode"])
    response, _ = await run(channel, command)
    assert response.status.code == code_pb2.OK, response.status
    [top] = response.result.output_files
    assert top.node_properties.HasField("mtime")
    assert stat.S_IMODE(top.node_properties.unix_mode.value) == 0o644
    [link] = response.result.output_symlinks
    assert link.target == "top" and link.node_properties.HasField("mtime")
    [directory] = response.result.output_directories
    tree = re_pb2.Tree.FromString(
        await CasClient(channel).read(Digest.from_proto(directory.tree_digest))
    )
    [node] = tree.root.files
    assert node.name == "f" and node.node_properties.unix_mode.value == 0o640
    assert tree.root.node_properties.HasField("mtime")


async def test_v2_1_unknown_output_node_property_is_invalid_argument(channel):
    command = build_command(["true"])
    command.output_node_properties.append("owner")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(channel, command)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'owner' is not a node property" in caught.value.details()


async def test_v2_2_platform_on_the_action(channel, server, tmp_path):
    """Matching reads Action.platform: a worker offering `pool=blue` runs it."""
    async with running_worker(server, tmp_path / "blue", platform={"pool": ("blue",)}):
        platform = re_pb2.Platform(properties=[re_pb2.Platform.Property(name="pool", value="blue")])
        response, _ = await run(channel, build_command(["true"]), action_platform=platform)
    assert response.status.code == code_pb2.OK, response.status


async def test_v2_3_compressed_upload_and_path_lookup(channel, worker):
    data = b"compressible " * 1000
    compressed = zstd_compressor().compress(data)
    reply = await re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(
                    digest=digest_of(data).to_proto(),
                    data=compressed,
                    compressor=re_pb2.Compressor.ZSTD,
                )
            ]
        )
    )
    assert reply.responses[0].status.code == code_pb2.OK
    assert await CasClient(channel).read(digest_of(data)) == data
    # v2.3: a bare argv[0] is looked up on the Command's PATH.
    command = build_command(["sh", "-c", "echo found > out"], output_paths=["out"])
    response, _ = await run(channel, command)
    assert response.status.code == code_pb2.OK, response.status


async def test_v2_5_digest_function_per_request(channel, worker):
    cas = re_grpc.ContentAddressableStorageStub(channel)
    found = await cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(
            blob_digests=[digest_of(b"nope").to_proto()], digest_function=SHA256
        )
    )
    assert len(found.missing_blob_digests) == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(digest_function=BLAKE3))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BLAKE3 is not supported" in caught.value.details()
    # The digest function may also be named in a ByteStream resource name.
    data = b"named function"
    read = bytestream_pb2_grpc.ByteStreamStub(channel).Read(
        bytestream_pb2.ReadRequest(resource_name=f"blobs/blake3/{'a' * 64}/{len(data)}")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in read:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Execute with digest_function SHA256; the operation metadata carries it (2.11) and
    # the worker's partial ExecutedActionMetadata while it runs (2.5).
    response, metadata = await run(
        channel, build_command(["sh", "-c", "sleep 0.5"]), digest_function=SHA256
    )
    assert response.status.code == code_pb2.OK, response.status
    assert all(m.digest_function == SHA256 for m in metadata)
    executing = [m for m in metadata if m.stage == re_pb2.ExecutionStage.EXECUTING]
    assert not executing or executing[-1].partial_execution_metadata.worker
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(channel, build_command(["true"]), digest_function=BLAKE3)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_v2_8_output_directory_format(channel, worker):
    command = build_command(["sh", "-c", "mkdir d && echo x > d/f"], output_paths=["d"])
    command.output_directory_format = re_pb2.Command.OutputDirectoryFormat.DIRECTORY_ONLY
    response, _ = await run(channel, command)
    [directory] = response.result.output_directories
    assert not directory.HasField("tree_digest")
    root = re_pb2.Directory.FromString(
        await CasClient(channel).read(Digest.from_proto(directory.root_directory_digest))
    )
    assert [f.name for f in root.files] == ["f"]


async def test_v2_9_inline_hints(channel, worker):
    command = build_command(["sh", "-c", "echo out; echo f > f"], output_paths=["f"])
    response, _ = await run(channel, command, inline_stdout=True, inline_output_files=["f"])
    assert response.result.stdout_raw == b"out\n"
    assert response.result.output_files[0].contents == b"f\n"


async def test_v2_12_split_and_splice(channel, server):
    cas = re_grpc.ContentAddressableStorageStub(channel)
    client = CasClient(channel)
    # Pseudo-random, so that content-defined chunking finds several cut points.
    import random

    data = random.Random(12).randbytes(5 * 1024 * 1024)
    await client.upload({digest_of(data): data})
    split = await cas.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=digest_of(data).to_proto()))
    chunks = [Digest.from_proto(d) for d in split.chunk_digests]
    assert len(chunks) > 1
    assert split.chunking_function == re_pb2.ChunkingFunction.UNKNOWN
    pieces = [await client.read(c) for c in chunks]
    assert b"".join(pieces) == data

    # Splice a new blob from the same chunks reversed: verified, then stored.
    reversed_data = b"".join(reversed(pieces))
    spliced = await cas.SpliceBlob(
        re_pb2.SpliceBlobRequest(
            blob_digest=digest_of(reversed_data).to_proto(),
            chunk_digests=[c.to_proto() for c in reversed(chunks)],
        )
    )
    assert Digest.from_proto(spliced.blob_digest) == digest_of(reversed_data)
    assert await client.read(digest_of(reversed_data)) == reversed_data

    # A claim that does not match the chunks is refused and stores nothing.
    wrong = digest_of(b"x" * len(data))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cas.SpliceBlob(
            re_pb2.SpliceBlobRequest(
                blob_digest=wrong.to_proto(), chunk_digests=[c.to_proto() for c in chunks]
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not await server.store.has(wrong)
    assert [p for p in server.store.tmp_dir.iterdir() if p.is_file()] == []

    missing = digest_of(b"never uploaded")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cas.SpliceBlob(
            re_pb2.SpliceBlobRequest(
                blob_digest=missing.to_proto(), chunk_digests=[missing.to_proto()]
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cas.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=missing.to_proto()))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cas.SpliceBlob(re_pb2.SpliceBlobRequest(chunk_digests=[chunks[0].to_proto()]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
