"""CAS, ByteStream and Capabilities servicers through a real grpc.aio server and real stubs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from dataclasses import dataclass

import grpc
import pytest
import zstandard

from expbuild.cas.store import FileStore
from expbuild.config import ServerSettings
from expbuild.digest import EMPTY, Digest, digest_of
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.server.bytestream import ByteStreamServicer
from expbuild.server.capabilities import CapabilitiesServicer
from expbuild.server.cas import ContentAddressableStorageServicer
from expbuild.server.instances import InstanceNames
from tests.serving import break_write

MiB = 1024 * 1024
BATCH_LIMIT = 1 * MiB
INSTANCES = ("", "team/linux")
MAX_MESSAGE = 64 * MiB
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CODE_OK = grpc.StatusCode.OK.value[0]
CODE_INVALID = INVALID.value[0]
CODE_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


@dataclass
class Env:
    store: FileStore
    cas: re_grpc.ContentAddressableStorageStub
    bs: bytestream_pb2_grpc.ByteStreamStub
    caps: re_grpc.CapabilitiesStub


@contextlib.asynccontextmanager
async def serving(store: FileStore):
    instances = InstanceNames(INSTANCES)
    settings = ServerSettings(max_batch_total_size_bytes=BATCH_LIMIT, instance_names=INSTANCES)
    server = grpc.aio.server(options=OPTIONS)
    re_grpc.add_ContentAddressableStorageServicer_to_server(
        ContentAddressableStorageServicer(store, instances, BATCH_LIMIT), server
    )
    re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesServicer(settings, instances), server)
    bytestream_pb2_grpc.add_ByteStreamServicer_to_server(
        ByteStreamServicer(store, instances), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
    try:
        yield Env(
            store,
            re_grpc.ContentAddressableStorageStub(channel),
            bytestream_pb2_grpc.ByteStreamStub(channel),
            re_grpc.CapabilitiesStub(channel),
        )
    finally:
        await channel.close()
        await server.stop(None)


@pytest.fixture
async def env(tmp_path):
    async with serving(FileStore(tmp_path / "cas", fsync=False)) as e:
        yield e


# ------------------------------------------------------------------ helpers


def proto(d: Digest) -> re_pb2.Digest:
    return d.to_proto()


def raw_digest(hash_: str, size: int) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hash_, size_bytes=size)


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def read_name(d: Digest, instance: str = "", compressed: bool = False) -> str:
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    return f"{instance + '/' if instance else ''}{kind}/{d.hash}/{d.size_bytes}"


def write_name(d: Digest, instance: str = "", compressed: bool = False, upload: str = "") -> str:
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    prefix = f"{instance}/" if instance else ""
    return f"{prefix}uploads/{upload or uuid.uuid4()}/{kind}/{d.hash}/{d.size_bytes}"


def requests_for(name: str, data: bytes, chunk: int, start: int = 0, finish: bool = True):
    """WriteRequests for `data` (the stream bytes from `start` on), offsets continuing from `start`."""
    out = []
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    for i, piece in enumerate(pieces):
        out.append(
            bytestream_pb2.WriteRequest(
                resource_name=name if i == 0 else "",
                write_offset=start + i * chunk,
                data=piece,
                finish_write=finish and i == len(pieces) - 1,
            )
        )
    return out


async def write(env: Env, name: str, data: bytes, chunk: int = 64 * 1024, start: int = 0):
    async def stream():
        for request in requests_for(name, data, chunk, start):
            yield request

    return await env.bs.Write(stream())


async def read(env: Env, name: str, offset: int = 0, limit: int = 0) -> list[bytes]:
    call = env.bs.Read(
        bytestream_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit)
    )
    return [response.data async for response in call]


async def query(env: Env, name: str) -> bytestream_pb2.QueryWriteStatusResponse:
    return await env.bs.QueryWriteStatus(bytestream_pb2.QueryWriteStatusRequest(resource_name=name))


async def rpc_error(awaitable, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    details = info.value.details() or ""
    assert info.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    return details


async def healthy(env: Env) -> None:
    """A normal call after an error still works: upload one blob, find it, read it back."""
    data = os.urandom(100)
    d = digest_of(data)
    response = await env.cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto(d), data=data)]
        )
    )
    assert response.responses[0].status.code == CODE_OK
    missing = await env.cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[proto(d)])
    )
    assert list(missing.missing_blob_digests) == []
    assert b"".join(await read(env, read_name(d))) == data


def upload_files(store: FileStore) -> list:
    return sorted(p.name for p in store.tmp_dir.iterdir())


def stored(store: FileStore, d: Digest) -> bool:
    return store.path_of(d).exists()


# ------------------------------------------------------------------ FindMissingBlobs


async def test_find_missing_blobs_and_touch(env):
    present, absent = b"present", b"absent"
    await env.store.put(digest_of(present), present)
    path = env.store.path_of(digest_of(present))
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    response = await env.cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(
            blob_digests=[proto(digest_of(present)), proto(digest_of(absent)), proto(EMPTY)]
        )
    )
    assert list(response.missing_blob_digests) == [proto(digest_of(absent))]
    assert time.time() - path.stat().st_mtime < 60  # touched: LRU sees it as just used


@pytest.mark.parametrize(
    "hash_, size, problem",
    [
        ("abc", -1, "has 3 characters"),
        ("zz" * 32, 1, "is not 64 lowercase hex characters"),
        ("AB" * 32, 1, "is not 64 lowercase hex characters"),
        ("ab" * 31, 5, "has 62 characters"),
        ("ab" * 32, -1, "size -1 must be a non-negative integer"),
    ],
)
async def test_find_missing_rejects_malformed_digests(env, hash_, size, problem):
    request = re_pb2.FindMissingBlobsRequest(
        blob_digests=[proto(digest_of(b"fine")), raw_digest(hash_, size)]
    )
    await rpc_error(env.cas.FindMissingBlobs(request), INVALID, "blob_digests[1]", problem)
    await healthy(env)


async def test_unsupported_digest_function(env):
    request = re_pb2.FindMissingBlobsRequest(
        blob_digests=[proto(digest_of(b"x"))], digest_function=re_pb2.DigestFunction.BLAKE3
    )
    await rpc_error(env.cas.FindMissingBlobs(request), INVALID, "BLAKE3", "SHA256")
    await healthy(env)


# ------------------------------------------------------------------ batch calls


async def test_batch_update_and_read_with_per_blob_errors(env):
    good1, good2, other = b"first blob", b"second blob", b"something else"
    d1, d2 = digest_of(good1), digest_of(good2)
    Req = re_pb2.BatchUpdateBlobsRequest.Request
    response = await env.cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                Req(digest=proto(d1), data=good1),
                Req(digest=raw_digest(d1.hash, len(good2)), data=good2),  # wrong hash
                Req(digest=raw_digest(digest_of(other).hash, 3), data=other),  # wrong size
                Req(digest=raw_digest("abc", -1), data=b"x"),  # malformed
                Req(digest=proto(d2), data=good2),
            ]
        )
    )
    codes = [r.status.code for r in response.responses]
    assert codes == [CODE_OK, CODE_INVALID, CODE_INVALID, CODE_INVALID, CODE_OK]
    assert "hashes to" in response.responses[1].status.message
    assert "expected 3" in response.responses[2].status.message
    assert "requests[3].digest" in response.responses[3].status.message
    assert response.responses[3].digest == raw_digest("abc", -1)
    assert stored(env.store, d1) and stored(env.store, d2)
    assert not stored(env.store, digest_of(other))

    missing = digest_of(b"never uploaded")
    response = await env.cas.BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(
            digests=[proto(d1), proto(missing), raw_digest("xyz", 1), proto(d2), proto(EMPTY)]
        )
    )
    results = [(r.status.code, r.data) for r in response.responses]
    assert results[0] == (CODE_OK, good1)
    assert results[1][0] == CODE_NOT_FOUND
    assert results[2][0] == CODE_INVALID
    assert results[3] == (CODE_OK, good2)
    assert results[4] == (CODE_OK, b"")
    assert response.responses[1].digest == proto(missing)
    assert all(r.compressor == re_pb2.Compressor.IDENTITY for r in response.responses)
    await healthy(env)


async def test_batch_disk_error_is_internal_with_an_incident_id(env, caplog):
    # The store's temp directory replaced by a file: writing any new blob fails (ENOTDIR).
    env.store.tmp_dir.rmdir()
    env.store.tmp_dir.write_bytes(b"")
    data = b"a blob the disk refuses"
    response = await env.cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=proto(digest_of(data)), data=data)
            ]
        )
    )
    status = response.responses[0].status
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    # The client gets an id to quote; the path stays in the server's log under that id.
    assert "internal error (id" in status.message and str(env.store.root) not in status.message
    incident = status.message.split("(id ")[1].split(")")[0]
    assert any(incident in r.getMessage() and r.exc_info for r in caplog.records)
    assert not stored(env.store, digest_of(data))


async def test_batch_over_the_limit_is_rejected_whole(env):
    a, b = os.urandom(600 * 1024), os.urandom(600 * 1024)
    Req = re_pb2.BatchUpdateBlobsRequest.Request
    request = re_pb2.BatchUpdateBlobsRequest(
        requests=[Req(digest=proto(digest_of(a)), data=a), Req(digest=proto(digest_of(b)), data=b)]
    )
    await rpc_error(
        env.cas.BatchUpdateBlobs(request), INVALID, "max_batch_total_size_bytes", str(BATCH_LIMIT)
    )
    assert not stored(env.store, digest_of(a)) and not stored(env.store, digest_of(b))

    await env.store.put(digest_of(a), a)
    await env.store.put(digest_of(b), b)
    read_request = re_pb2.BatchReadBlobsRequest(digests=[proto(digest_of(a)), proto(digest_of(b))])
    await rpc_error(env.cas.BatchReadBlobs(read_request), INVALID, "max_batch_total_size_bytes")
    # Each on its own fits.
    response = await env.cas.BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(digests=[proto(digest_of(a))])
    )
    assert response.responses[0].data == a
    await healthy(env)


async def test_batch_zstd_both_directions(env):
    text = b"compress me " * 5000
    d = digest_of(text)
    lie = zstd(b"other bytes entirely")
    Req = re_pb2.BatchUpdateBlobsRequest.Request
    ZSTD = re_pb2.Compressor.ZSTD
    response = await env.cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                Req(digest=proto(d), data=zstd(text), compressor=ZSTD),
                Req(digest=proto(digest_of(b"garbage")), data=b"not zstd at all", compressor=ZSTD),
                Req(digest=proto(digest_of(b"other bytes entirely!")), data=lie, compressor=ZSTD),
                Req(
                    digest=proto(digest_of(b"deflated")),
                    data=b"deflated",
                    compressor=re_pb2.Compressor.DEFLATE,
                ),
                Req(digest=proto(digest_of(b"x" * 10)), data=zstd(b"x" * 1000), compressor=ZSTD),
            ]
        )
    )
    codes = [r.status.code for r in response.responses]
    assert codes == [CODE_OK, CODE_INVALID, CODE_INVALID, CODE_INVALID, CODE_INVALID]
    messages = [r.status.message for r in response.responses]
    assert "not valid zstd" in messages[1]
    assert "decompresses to 20 bytes, expected 21" in messages[2]
    assert "'deflate' is not supported" in messages[3]
    assert "decompresses to at least" in messages[4]
    assert (await env.store.get(d)) == text

    response = await env.cas.BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(
            digests=[proto(d), proto(EMPTY)], acceptable_compressors=[ZSTD]
        )
    )
    first, empty = response.responses
    assert first.status.code == CODE_OK and first.compressor == ZSTD
    assert len(first.data) < len(text) and unzstd(first.data) == text
    assert empty.status.code == CODE_OK and unzstd(empty.data) == b""
    await healthy(env)


async def test_batch_update_with_right_hash_wrong_content_after_zstd(env):
    # Same size, different content: caught by the hash check after decompression.
    data, wrong = b"a" * 64, b"b" * 64
    Req = re_pb2.BatchUpdateBlobsRequest.Request
    response = await env.cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                Req(
                    digest=proto(digest_of(data)),
                    data=zstd(wrong),
                    compressor=re_pb2.Compressor.ZSTD,
                )
            ]
        )
    )
    assert response.responses[0].status.code == CODE_INVALID
    assert "hashes to" in response.responses[0].status.message
    assert not stored(env.store, digest_of(data))


# ------------------------------------------------------------------ ByteStream write/read


async def test_bytestream_write_many_chunks_and_read_back(env):
    data = os.urandom(5 * MiB + 321)
    d = digest_of(data)
    response = await write(env, write_name(d), data, chunk=61 * 1024)
    assert response.committed_size == d.size_bytes
    assert (await env.store.get(d)) == data
    assert upload_files(env.store) == []

    chunks = await read(env, read_name(d))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= MiB for c in chunks) and len(chunks) == 6

    assert (
        b"".join(await read(env, read_name(d), offset=MiB + 5, limit=100))
        == data[MiB + 5 : MiB + 105]
    )
    assert b"".join(await read(env, read_name(d), offset=d.size_bytes - 10)) == data[-10:]
    assert await read(env, read_name(d), offset=d.size_bytes) == []
    status = await query(env, write_name(d))
    assert status.complete and status.committed_size == d.size_bytes


async def test_bytestream_instance_name_with_slashes(env):
    data = b"instance data"
    d = digest_of(data)
    response = await write(env, write_name(d, instance="team/linux") + "/some/metadata", data)
    assert response.committed_size == len(data)
    assert b"".join(await read(env, read_name(d, instance="team/linux"))) == data
    # sha256 named explicitly (the REAPI 2.3 digest-function form)
    assert b"".join(await read(env, f"team/linux/blobs/sha256/{d.hash}/{d.size_bytes}")) == data


async def test_read_errors(env):
    data = b"0123456789"
    d = digest_of(data)
    await env.store.put(d, data)
    await rpc_error(
        read(env, read_name(d), offset=11), grpc.StatusCode.OUT_OF_RANGE, "past the end"
    )
    await rpc_error(read(env, read_name(d), offset=-1), grpc.StatusCode.OUT_OF_RANGE, "negative")
    await rpc_error(read(env, read_name(d), limit=-1), INVALID, "read_limit -1 is negative")
    absent = digest_of(b"absent")
    await rpc_error(read(env, read_name(absent)), grpc.StatusCode.NOT_FOUND, absent.hash)
    await healthy(env)


H = "ab" * 32


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("", "is not of the form"),
        ("blobs", "is not of the form"),
        (f"blobs/{H}", "is not of the form"),
        (f"blobs/{H}/12/extra", "is not of the form"),
        (f"blobs/{H}/-1", "size '-1' is not a non-negative integer"),
        (f"blobs/{H}/ten", "size 'ten'"),
        ("blobs/abc/-1", "size '-1'"),
        ("blobs/abc/3", "has 3 characters"),
        (f"blobs/{'zz' * 32}/3", "lowercase hex"),
        ("some/path/without/keyword", "is not of the form"),
        (f"uploads/{uuid.uuid4()}/blobs/{H}/1", "is an upload name"),
        (f"compressed-blobs/gzip/{H}/1", "'gzip' is not supported"),
        (f"compressed-blobs/{H}/1", "is not supported"),
        (f"blobs/blake3/{H}/1", "digest function 'blake3' is not supported"),
    ],
)
async def test_unparsable_read_names(env, name, fragment):
    details = await rpc_error(read(env, name), INVALID, fragment)
    if "is not of the form" in fragment:
        assert "{instance_name}/blobs/{hash}/{size}" in details
    await healthy(env)


@pytest.mark.parametrize(
    "name, fragment",
    [
        (f"blobs/{H}/1", "is not of the form"),
        (f"uploads//blobs/{H}/1", "empty uuid"),
        (f"uploads/u1/{H}/1", "is not of the form"),
        (f"uploads/u1/blobs/{H}", "is not of the form"),
        (f"uploads/u1/blobs/{H}/x", "size 'x'"),
        (f"uploads/u1/compressed-blobs/brotli/{H}/1", "'brotli' is not supported"),
    ],
)
async def test_unparsable_write_names(env, name, fragment):
    details = await rpc_error(write(env, name, b"x"), INVALID, fragment)
    if "is not of the form" in fragment:
        assert "{instance_name}/uploads/{uuid}/blobs/{hash}/{size}" in details
    await rpc_error(query(env, name), INVALID, fragment)
    await healthy(env)


async def test_write_without_resource_name_and_empty_stream(env):
    async def nameless():
        yield bytestream_pb2.WriteRequest(data=b"x", finish_write=True)

    await rpc_error(env.bs.Write(nameless()), INVALID, "must set resource_name")

    async def nothing():
        return
        yield  # pragma: no cover

    await rpc_error(env.bs.Write(nothing()), INVALID, "no WriteRequest")
    await healthy(env)


async def test_wrong_write_offset(env):
    data = os.urandom(300)
    d = digest_of(data)
    await rpc_error(
        write(env, write_name(d), data, start=5), INVALID, "write_offset 5", "0 bytes committed"
    )
    name = write_name(d)

    async def skipping():
        yield bytestream_pb2.WriteRequest(resource_name=name, write_offset=0, data=data[:100])
        yield bytestream_pb2.WriteRequest(write_offset=150, data=data[150:], finish_write=True)

    await rpc_error(env.bs.Write(skipping()), INVALID, "write_offset 150", "100 bytes committed")
    # The upload keeps what it had and can be finished from there.
    assert (await query(env, name)).committed_size == 100
    response = await write(env, name, data[100:], start=100)
    assert response.committed_size == len(data)
    assert stored(env.store, d)
    await healthy(env)


async def test_resource_name_must_not_change(env):
    data = os.urandom(200)
    d = digest_of(data)
    name = write_name(d)

    async def changing():
        yield bytestream_pb2.WriteRequest(resource_name=name, data=data[:100])
        yield bytestream_pb2.WriteRequest(
            resource_name=write_name(d), write_offset=100, data=data[100:], finish_write=True
        )

    await rpc_error(env.bs.Write(changing()), INVALID, "resource_name changed")
    await healthy(env)


async def test_write_content_mismatch_stores_nothing(env):
    data = os.urandom(2 * MiB)
    d = digest_of(data)
    wrong = bytearray(data)
    wrong[-1] ^= 1
    await rpc_error(write(env, write_name(d), bytes(wrong)), INVALID, "hashes to")
    await rpc_error(
        write(env, write_name(d), data[:-1]), INVALID, f"received {len(data) - 1} bytes"
    )
    await rpc_error(write(env, write_name(d), data + b"!"), INVALID, "received at least")
    assert not stored(env.store, d)
    assert upload_files(env.store) == []
    await healthy(env)


async def test_write_of_existing_blob_returns_early(env):
    data = os.urandom(3 * MiB)
    d = digest_of(data)
    await env.store.put(d, data)

    def first_message_only(name: str, payload: bytes):
        async def stream():
            yield requests_for(name, payload, 64 * 1024)[0]
            await asyncio.Event().wait()  # the rest never comes: the server must not wait for it

        return stream()

    response = await asyncio.wait_for(env.bs.Write(first_message_only(write_name(d), data)), 10)
    assert response.committed_size == d.size_bytes
    name = write_name(d, compressed=True)
    compressed = await asyncio.wait_for(env.bs.Write(first_message_only(name, zstd(data))), 10)
    assert compressed.committed_size == -1
    empty = await write(env, write_name(EMPTY), b"")
    assert empty.committed_size == 0


async def test_stream_ended_without_finish_write_can_be_resumed(env):
    data = os.urandom(100_000)
    d = digest_of(data)
    name = write_name(d)

    async def unfinished():
        for request in requests_for(name, data[:60_000], 10_000, finish=False):
            yield request

    await rpc_error(
        env.bs.Write(unfinished()), INVALID, "without finish_write", "write_offset 60000"
    )
    status = await query(env, name)
    assert (status.committed_size, status.complete) == (60_000, False)
    response = await write(env, name, data[60_000:], start=60_000)
    assert response.committed_size == len(data)
    assert (await env.store.get(d)) == data


async def test_resumed_write_after_broken_stream(env):
    data = os.urandom(3 * MiB + 17)
    d = digest_of(data)
    name = write_name(d)
    chunk = 256 * 1024
    committed = await break_write(env.store, env.bs, name, data[: 6 * chunk], chunk)
    assert committed == 6 * chunk  # 1 MiB on disk, the rest still buffered in the session
    # Resuming anywhere but the committed offset is refused and changes nothing. (One
    # message only: a client still sending when the server answers may see its own
    # send fail rather than the server's status.)
    await rpc_error(
        write(env, name, data[chunk : chunk + 100], start=chunk),
        INVALID,
        f"{committed} bytes committed",
    )
    response = await write(env, name, data[committed:], chunk=chunk, start=committed)
    assert response.committed_size == d.size_bytes
    assert (await env.store.get(d)) == data
    status = await query(env, name)
    assert status.complete and status.committed_size == d.size_bytes
    assert upload_files(env.store) == []
    await healthy(env)


async def test_resumed_compressed_write_after_broken_stream(env):
    # REAPI: a compressed upload resumes at an uncompressed offset with the rest of the
    # blob compressed afresh; offsets within a stream add the compressed bytes sent.
    data = os.urandom(MiB) + b"z" * (2 * MiB)
    d = digest_of(data)
    name = write_name(d, compressed=True)
    chunk = 128 * 1024
    committed = await break_write(env.store, env.bs, name, zstd(data)[: 5 * chunk], chunk)
    assert 0 < committed < MiB  # decoded bytes of the random part that arrived
    rest = zstd(data[committed:])

    async def wrong_second_offset():
        yield bytestream_pb2.WriteRequest(
            resource_name=name, write_offset=committed, data=rest[:100]
        )
        yield bytestream_pb2.WriteRequest(write_offset=committed + 99, data=rest[100:])

    await rpc_error(
        env.bs.Write(wrong_second_offset()),
        INVALID,
        f"write_offset {committed + 99}",
        "compressed bytes",
    )
    # The first message was taken; what it decoded to counts, the rest of its frame is dropped.
    again = (await query(env, name)).committed_size
    assert committed <= again < committed + 100
    committed, rest = again, zstd(data[again:])
    response = await write(env, name, rest, chunk=chunk, start=committed)
    assert response.committed_size == committed + len(rest)
    assert (await env.store.get(d)) == data
    status = await query(env, name)
    assert status.complete and status.committed_size == len(data)
    assert upload_files(env.store) == []


@pytest.mark.parametrize("compressed", [False, True])
async def test_upload_survives_a_restart(tmp_path, compressed):
    root = tmp_path / "cas"
    data = os.urandom(3 * MiB)
    d = digest_of(data)
    name = write_name(d, compressed=compressed)
    chunk = 256 * 1024
    sent = (zstd(data) if compressed else data)[: 6 * chunk]
    async with serving(FileStore(root, fsync=False)) as first:
        before = await break_write(first.store, first.bs, name, sent, chunk)
    async with serving(FileStore(root, fsync=False)) as second:
        status = await query(second, name)
        assert not status.complete
        if compressed:
            assert status.committed_size == before  # decoded when it was queried
        else:
            # What had reached the disk (the first MiB) survives; the buffered rest is gone.
            assert status.committed_size == MiB
        at = status.committed_size
        rest = zstd(data[at:]) if compressed else data[at:]
        response = await write(second, name, rest, chunk=chunk, start=at)
        assert response.committed_size == (at + len(rest) if compressed else len(data))
        assert (await second.store.get(d)) == data


async def test_idle_uploads_are_dropped(tmp_path):
    store = FileStore(tmp_path / "cas", fsync=False, upload_idle_timeout=0.0)
    async with serving(store) as env:
        data = os.urandom(2 * MiB)
        name = write_name(digest_of(data))
        chunk = 256 * 1024
        assert await break_write(env.store, env.bs, name, data[: 5 * chunk], chunk) > 0
        assert upload_files(store) != []
        # Opening another upload sweeps the idle one away.
        await write(env, write_name(digest_of(b"other")), b"other")
        assert (await query(env, name)).committed_size == 0
        assert upload_files(store) == []


# ------------------------------------------------------------------ zstd over ByteStream


async def test_zstd_round_trips(env):
    data = (b"highly compressible line\n" * 200_000) + os.urandom(1000)
    d = digest_of(data)
    packed = zstd(data)
    response = await write(env, write_name(d, compressed=True), packed, chunk=32 * 1024)
    assert response.committed_size == len(packed)
    assert (await env.store.get(d)) == data

    pieces = await read(env, read_name(d, compressed=True))
    assert all(0 < len(p) <= MiB for p in pieces)
    assert unzstd(b"".join(pieces)) == data
    assert (
        unzstd(b"".join(await read(env, read_name(d, compressed=True), offset=12345)))
        == data[12345:]
    )
    assert unzstd(b"".join(await read(env, read_name(d, compressed=True), offset=len(data)))) == b""
    await rpc_error(
        read(env, read_name(d, compressed=True), limit=10), INVALID, "read_limit must be 0"
    )
    await rpc_error(
        read(env, read_name(d, compressed=True), offset=len(data) + 1), grpc.StatusCode.OUT_OF_RANGE
    )

    # Uploaded plain, read compressed; uploaded compressed, read plain.
    other = os.urandom(2 * MiB)
    od = digest_of(other)
    await write(env, write_name(od), other)
    assert unzstd(b"".join(await read(env, read_name(od, compressed=True)))) == other
    assert unzstd(b"".join(await read(env, read_name(EMPTY, compressed=True)))) == b""
    await healthy(env)


async def test_bad_compressed_writes(env):
    data = os.urandom(200_000)
    d = digest_of(data)
    await rpc_error(
        write(env, write_name(d, compressed=True), os.urandom(5000)), INVALID, "not valid zstd"
    )
    other = os.urandom(200_000)
    await rpc_error(write(env, write_name(d, compressed=True), zstd(other)), INVALID, "hashes to")
    await rpc_error(
        write(env, write_name(d, compressed=True), zstd(data[:-5])),
        INVALID,
        "decompresses to 199995 bytes",
    )
    await rpc_error(
        write(env, write_name(d, compressed=True), zstd(data)[:-100]), INVALID, "decompresses to"
    )
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * MiB))
    await rpc_error(
        write(env, write_name(d, compressed=True), bomb), INVALID, "decompresses to at least"
    )
    assert not stored(env.store, d)
    assert upload_files(env.store) == []
    await healthy(env)


# ------------------------------------------------------------------ GetTree


def directory(
    files: dict[str, bytes] | None = None, dirs: dict[str, re_pb2.Directory] | None = None
):
    return re_pb2.Directory(
        files=[
            re_pb2.FileNode(name=n, digest=proto(digest_of(c)))
            for n, c in sorted((files or {}).items())
        ],
        directories=[
            re_pb2.DirectoryNode(name=n, digest=proto(digest_of(d.SerializeToString())))
            for n, d in sorted((dirs or {}).items())
        ],
    )


async def put_dir(store: FileStore, d: re_pb2.Directory) -> Digest:
    blob = d.SerializeToString()
    await store.put(digest_of(blob), blob)
    return digest_of(blob)


async def get_tree(env: Env, root: Digest, page_size: int = 0, token: str = ""):
    call = env.cas.GetTree(
        re_pb2.GetTreeRequest(root_digest=proto(root), page_size=page_size, page_token=token)
    )
    return [r async for r in call]


async def test_get_tree_paging_on_three_levels(env):
    leaf1 = directory(files={"a.txt": b"a"})
    leaf2 = directory(files={"b.txt": b"b"})
    leaf3 = directory(files={"c.txt": b"c", "d.txt": b"d"})
    mid1 = directory(files={"m1": b"m1"}, dirs={"l1": leaf1, "l2": leaf2})
    mid2 = directory(dirs={"l3": leaf3, "again": leaf1})  # leaf1 shared: listed once
    root = directory(files={"README": b"r"}, dirs={"m1": mid1, "m2": mid2})
    for d in (leaf1, leaf2, leaf3, mid1, mid2):
        await put_dir(env.store, d)
    root_digest = await put_dir(env.store, root)
    everything = [root, mid1, mid2, leaf1, leaf2, leaf3]

    whole = await get_tree(env, root_digest)
    assert len(whole) == 1 and list(whole[0].directories) == everything
    assert whole[0].next_page_token == ""

    pages = await get_tree(env, root_digest, page_size=2)
    assert [len(p.directories) for p in pages] == [2, 2, 2]
    assert [d for p in pages for d in p.directories] == everything
    assert all(p.next_page_token for p in pages[:-1]) and pages[-1].next_page_token == ""
    assert list(pages[0].directories) == [root, mid1]

    # Resume from a token: that page and the ones after it.
    resumed = await get_tree(env, root_digest, page_size=4, token=pages[0].next_page_token)
    assert [d for p in resumed for d in p.directories] == everything[2:]

    await rpc_error(get_tree(env, root_digest, token="not-a-token"), INVALID, "page_token")
    other_root = await put_dir(env.store, leaf3)
    await rpc_error(
        get_tree(env, other_root, token=pages[0].next_page_token), INVALID, "page_token"
    )
    await rpc_error(get_tree(env, root_digest, page_size=-1), INVALID, "page_size")
    await healthy(env)


async def test_get_tree_omits_missing_parts_and_needs_its_root(env):
    leaf = directory(files={"x": b"x"})
    missing_mid = directory(dirs={"leaf": leaf})
    present_mid = directory(files={"y": b"y"})
    root = directory(dirs={"gone": missing_mid, "here": present_mid})
    await put_dir(env.store, leaf)  # present, but only reachable through the missing directory
    await put_dir(env.store, present_mid)
    root_digest = await put_dir(env.store, root)
    pages = await get_tree(env, root_digest)
    assert [d for p in pages for d in p.directories] == [root, present_mid]

    absent = digest_of(directory(files={"nope": b"n"}).SerializeToString())
    await rpc_error(get_tree(env, absent), grpc.StatusCode.NOT_FOUND, "root directory", absent.hash)
    await rpc_error(
        env.cas.GetTree(re_pb2.GetTreeRequest(root_digest=raw_digest("abc", -1))).read(),
        INVALID,
        "root_digest",
    )
    # The empty Directory is always present.
    assert [list(p.directories) for p in await get_tree(env, EMPTY)] == [[re_pb2.Directory()]]
    await healthy(env)


# ------------------------------------------------------------------ Capabilities and instances


async def test_capabilities(env):
    caps = await env.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="team/linux"))
    cache = caps.cache_capabilities
    assert list(cache.digest_functions) == [re_pb2.DigestFunction.SHA256]
    assert cache.action_cache_update_capabilities.update_enabled
    assert cache.max_batch_total_size_bytes == BATCH_LIMIT
    assert cache.symlink_absolute_path_strategy == re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED
    assert list(cache.supported_compressors) == [re_pb2.Compressor.ZSTD]
    assert list(cache.supported_batch_update_compressors) == [re_pb2.Compressor.ZSTD]
    execution = caps.execution_capabilities
    assert execution.exec_enabled
    assert execution.digest_function == re_pb2.DigestFunction.SHA256
    assert list(execution.digest_functions) == [re_pb2.DigestFunction.SHA256]
    priority = execution.execution_priority_capabilities.priorities[0]
    assert priority.min_priority < 0 < priority.max_priority
    assert (caps.low_api_version.major, caps.low_api_version.minor) == (2, 0)
    assert (caps.high_api_version.major, caps.high_api_version.minor) == (2, 12)
    assert cache.split_blob_support and cache.splice_blob_support
    assert (caps.deprecated_api_version.major, caps.deprecated_api_version.minor) == (2, 0)


async def test_capabilities_follow_settings():
    servicer = CapabilitiesServicer(
        ServerSettings(allow_action_cache_updates=False, max_batch_total_size_bytes=1234),
        InstanceNames([""]),
    )
    caps = await servicer.GetCapabilities(re_pb2.GetCapabilitiesRequest(), None)
    assert not caps.cache_capabilities.action_cache_update_capabilities.update_enabled
    assert caps.cache_capabilities.max_batch_total_size_bytes == 1234
    assert caps.execution_capabilities.exec_enabled


async def test_unknown_instance_is_rejected_everywhere(env):
    d = digest_of(b"blob")
    await env.store.put(d, b"blob")
    unknown = "no/such-instance"
    calls = [
        env.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=unknown)),
        env.cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(instance_name=unknown, blob_digests=[proto(d)])
        ),
        env.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(instance_name=unknown)),
        env.cas.BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(instance_name=unknown, digests=[proto(d)])
        ),
        get_tree_unknown(env, unknown, d),
        read(env, read_name(d, instance=unknown)),
        write(env, write_name(d, instance=unknown), b"blob"),
        query(env, write_name(d, instance=unknown)),
    ]
    for call in calls:
        await rpc_error(call, INVALID, "unknown instance name", repr(unknown))
    await healthy(env)


async def get_tree_unknown(env: Env, instance: str, root: Digest):
    call = env.cas.GetTree(re_pb2.GetTreeRequest(instance_name=instance, root_digest=proto(root)))
    return [r async for r in call]
