"""The client library's CAS transfers against a real server: capabilities, zstd, resumable
uploads, GetTree paging and the error paths (unknown instance, oversize batch).

A server replica (real gRPC, real Postgres, file CAS) runs in the test's event loop. To
see what goes over the wire, some tests give the client a channel with a recording
interceptor; to break a connection mid-upload, one relays it through a TCP proxy that cuts
the first connection after a number of bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import zstandard
from click.testing import CliRunner
from prometheus_client import REGISTRY

from expbuild.cli.client_commands import EXIT_FAILURE, run
from expbuild.client import batches
from expbuild.client.capabilities import fetch_capabilities
from expbuild.client.cas import (
    DEFAULT_MAX_BATCH_BYTES,
    IDENTITY,
    ZSTD,
    ZSTD_MIN_BYTES,
    CasClient,
)
from expbuild.client.channel import MAX_MESSAGE_BYTES, open_channel
from expbuild.client.integrity import INLINE_CHECK_BYTES, BlobCheck
from expbuild.client.run import run_command
from expbuild.client.tree import materialize, merkle_tree_from_directory
from expbuild.digest import Digest, digest_of
from expbuild.errors import FailedPrecondition, InvalidArgument, NotFound
from expbuild.proto import bytestream_pb2_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.reapi.resource_names import parse_upload_name
from expbuild.server.app import ServerApp
from expbuild.worker.agent import WorkerAgent
from tests.serving import break_write, running_server, running_worker, server_settings
from tests.waiting import wait_until

KiB = 1024
MiB = 1024 * KiB
SMALL_BATCH_LIMIT = 64 * KiB
UNKNOWN_INSTANCE = "no/such-instance"
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@pytest.fixture
async def server(database_url, tmp_path) -> AsyncIterator[ServerApp]:
    async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
        yield app


@pytest.fixture
async def small_batch_server(database_url, tmp_path) -> AsyncIterator[ServerApp]:
    settings = server_settings(tmp_path / "cas", max_batch_total_size_bytes=SMALL_BATCH_LIMIT)
    async with running_server(settings, database_url) as app:
        yield app


def target_of(app: ServerApp) -> str:
    return f"127.0.0.1:{app.port}"


def compressible(size: int, seed: int = 0) -> bytes:
    line = f"line {seed}: the quick brown fox jumps over the lazy dog\n".encode()
    return (line * (size // len(line) + 1))[:size]


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def upload_key(name: str) -> tuple[Digest, bool]:
    """(digest, compressed) of a ByteStream upload name."""
    parsed = parse_upload_name(name)
    return parsed.digest, parsed.compressor is not None


async def stored(app: ServerApp, digest: Digest) -> bytes:
    """The blob as the server's FileStore holds it on disk."""
    return await asyncio.to_thread(app.store.path_of(digest).read_bytes)


# -- what goes over the wire ----------------------------------------------------------------


@dataclass
class Wire:
    """What a client sent and received, seen by a gRPC client interceptor."""

    batch_updates: list[re_pb2.BatchUpdateBlobsRequest.Request] = field(default_factory=list)
    batch_read_requests: list[re_pb2.BatchReadBlobsRequest] = field(default_factory=list)
    batch_read_responses: list[re_pb2.BatchReadBlobsResponse.Response] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)  # ByteStream Read resource names
    writes: dict[str, int] = field(default_factory=dict)  # Write resource name -> data bytes


def _method(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]


# grpc.aio files each interceptor object under one kind of call only, hence three classes.
class _RecordBatches(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        call = await continuation(client_call_details, request)
        method = _method(client_call_details)
        if method == "BatchUpdateBlobs":
            self.wire.batch_updates.extend(request.requests)
        elif method == "BatchReadBlobs":
            self.wire.batch_read_requests.append(request)
            self.wire.batch_read_responses.extend((await call).responses)
        return call


class _RecordReads(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        if _method(client_call_details) == "Read":
            self.wire.reads.append(request.resource_name)
        return await continuation(client_call_details, request)


class _RecordWrites(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        if _method(client_call_details) != "Write":
            return await continuation(client_call_details, request_iterator)
        writes = self.wire.writes

        async def watched():
            name = ""
            async for request in request_iterator:
                name = request.resource_name or name
                writes[name] = writes.get(name, 0) + len(request.data)
                yield request

        return await continuation(client_call_details, watched())


@contextlib.asynccontextmanager
async def recorded_channel(target: str) -> AsyncIterator[tuple[grpc.aio.Channel, Wire]]:
    wire = Wire()
    interceptors = [_RecordBatches(wire), _RecordReads(wire), _RecordWrites(wire)]
    channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS, interceptors=interceptors)
    try:
        yield channel, wire
    finally:
        await channel.close()


# -- capabilities and error paths -------------------------------------------------------------


async def test_capabilities_are_read_and_applied(small_batch_server: ServerApp):
    async with open_channel(target_of(small_batch_server)) as channel:
        capabilities = await fetch_capabilities(channel, "")
        cache = capabilities.cache_capabilities
        assert cache.max_batch_total_size_bytes == SMALL_BATCH_LIMIT
        assert list(cache.supported_compressors) == [ZSTD]
        assert list(cache.supported_batch_update_compressors) == [ZSTD]
        assert list(cache.digest_functions) == [re_pb2.DigestFunction.SHA256]

        cas = await CasClient.connect(channel)
        assert cas.max_batch_bytes == SMALL_BATCH_LIMIT
        assert (cas.compressor, cas.batch_update_compressor) == (ZSTD, ZSTD)
        assert cas.fits_in_batch(Digest("0" * 64, 40 * KiB))
        assert not cas.fits_in_batch(Digest("0" * 64, SMALL_BATCH_LIMIT))

    # The plain constructor makes no RPC: it works on a channel to nowhere.
    async with open_channel("127.0.0.1:1") as nowhere:
        plain = CasClient(nowhere)
        assert (plain.max_batch_bytes, plain.compressor) == (DEFAULT_MAX_BATCH_BYTES, IDENTITY)
        assert CasClient(nowhere, compressor=ZSTD).batch_update_compressor == ZSTD
        with pytest.raises(ValueError, match="compressor"):
            CasClient(nowhere, compressor=re_pb2.Compressor.DEFLATE)


async def test_unknown_instance_is_refused_naming_it(server: ServerApp, channel):
    with pytest.raises(InvalidArgument, match=UNKNOWN_INSTANCE):
        await fetch_capabilities(channel, UNKNOWN_INSTANCE)
    with pytest.raises(InvalidArgument, match=UNKNOWN_INSTANCE):
        await CasClient.connect(channel, UNKNOWN_INSTANCE)
    with pytest.raises(InvalidArgument, match=UNKNOWN_INSTANCE):
        await CasClient(channel, UNKNOWN_INSTANCE).find_missing([digest_of(b"x")])
    with pytest.raises(InvalidArgument, match=UNKNOWN_INSTANCE):
        await run_command(target_of(server), ["true"], instance_name=UNKNOWN_INSTANCE)

    def cli():  # in a thread: the command runs its own event loop
        args = ["--server", target_of(server), "--instance", UNKNOWN_INSTANCE, "--", "true"]
        return CliRunner().invoke(run, args, catch_exceptions=False)

    result = await asyncio.to_thread(cli)
    assert result.exit_code == EXIT_FAILURE
    assert f"unknown instance name {UNKNOWN_INSTANCE!r}" in result.stderr


async def test_oversize_batch_is_refused_and_the_client_splits_its_batches(
    small_batch_server: ServerApp,
):
    blobs = {digest_of(b): b for b in (os.urandom(40 * KiB) for _ in range(5))}
    async with open_channel(target_of(small_batch_server)) as channel:
        stub = re_grpc.ContentAddressableStorageStub(channel)
        oversize = re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=data)
                for d, data in blobs.items()
            ]
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.BatchUpdateBlobs(oversize)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_batch_total_size_bytes" in raised.value.details()
        assert str(SMALL_BATCH_LIMIT) in raised.value.details()

        # A client that ignores the server's limit puts all five in one batch, refused.
        with pytest.raises(InvalidArgument, match="max_batch_total_size_bytes"):
            await CasClient(channel).upload(blobs)

        # One set up from the capabilities sends batches the server takes.
        cas = await CasClient.connect(channel)
        assert await cas.upload(blobs) == 5 * 40 * KiB
        assert await cas.find_missing(blobs) == []
        assert await cas.read_many(blobs) == blobs

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.BatchReadBlobs(
                re_pb2.BatchReadBlobsRequest(digests=[d.to_proto() for d in blobs])
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_batch_total_size_bytes" in raised.value.details()


# -- zstd -----------------------------------------------------------------------------------


async def test_zstd_round_trip_through_batches_and_bytestream(server: ServerApp, tmp_path: Path):
    tiny = compressible(200, seed=1)  # under ZSTD_MIN_BYTES: sent as is
    text = compressible(300 * KiB, seed=2)
    noise = os.urandom(64 * KiB)  # zstd cannot shrink it: sent as is
    large_text = compressible(6 * MiB + 5, seed=3)
    large_noise_file = tmp_path / "noise.bin"
    large_noise_file.write_bytes(os.urandom(5 * MiB))
    large_noise = large_noise_file.read_bytes()
    contents = {digest_of(b): b for b in (tiny, text, noise, large_text, large_noise)}
    sources: dict[Digest, bytes | Path] = {**contents, digest_of(large_noise): large_noise_file}

    async with recorded_channel(target_of(server)) as (channel, wire):
        cas = await CasClient.connect(channel)
        assert await cas.upload(sources) == sum(d.size_bytes for d in contents)

        sent = {Digest.from_proto(r.digest): r for r in wire.batch_updates}
        assert set(sent) == {digest_of(tiny), digest_of(text), digest_of(noise)}
        assert (sent[digest_of(tiny)].compressor, sent[digest_of(tiny)].data) == (IDENTITY, tiny)
        assert sent[digest_of(noise)].compressor == IDENTITY
        assert sent[digest_of(text)].compressor == ZSTD
        assert len(sent[digest_of(text)].data) < len(text) // 10

        written = {upload_key(name): size for name, size in wire.writes.items()}
        assert set(written) == {(digest_of(large_text), True), (digest_of(large_noise), True)}
        assert written[digest_of(large_text), True] < len(large_text) // 10

    # The CAS holds the uncompressed bytes, whatever travelled.
    for digest, data in contents.items():
        assert await stored(server, digest) == data
        assert await server.store.get(digest) == data

    async with recorded_channel(target_of(server)) as (channel, wire):
        cas = await CasClient.connect(channel)
        assert await cas.read_many(contents) == contents
        out = tmp_path / "out" / "large.txt"
        await cas.read_to_file(digest_of(large_text), out)
        assert out.read_bytes() == large_text
        assert await cas.read(digest_of(text)) == text

        # Tiny blobs are asked for without compression, in a batch of their own.
        for request in wire.batch_read_requests:
            digests = [Digest.from_proto(d) for d in request.digests]
            small = [d.size_bytes < ZSTD_MIN_BYTES for d in digests]
            assert all(small) or not any(small)
            assert list(request.acceptable_compressors) == ([] if all(small) else [ZSTD])
        by_digest = {Digest.from_proto(r.digest): r for r in wire.batch_read_responses}
        assert by_digest[digest_of(text)].compressor == ZSTD
        assert len(by_digest[digest_of(text)].data) < len(text) // 10
        assert by_digest[digest_of(tiny)].compressor == IDENTITY
        prefix = "compressed-blobs/zstd/"
        assert sorted(wire.reads) == sorted(
            [f"{prefix}{digest_of(large_text).hash}/{digest_of(large_text).size_bytes}"] * 2
            + [f"{prefix}{digest_of(large_noise).hash}/{digest_of(large_noise).size_bytes}"]
        )

    # Blobs uploaded compressed read back plainly, and the other way round.
    async with open_channel(target_of(server)) as channel:
        plain = CasClient(channel)
        assert await plain.read_many(contents) == contents
        other = {digest_of(b): b for b in (compressible(500 * KiB, 4), compressible(5 * MiB, 5))}
        await plain.upload(other)
        assert await (await CasClient.connect(channel)).read_many(other) == other


# -- resumable uploads ------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "zstd"])
async def test_reads_are_checked_off_the_event_loop(
    server: ServerApp, channel, monkeypatch, compressed: bool
):
    """Hashing and decoding what arrives runs in threads, one hop per batch and per large
    ByteStream message, so a worker's heartbeat never waits behind it; only small amounts
    are checked inline, where a thread hop would cost more than the work."""
    where: list[tuple[str, int, bool]] = []  # (what, bytes, on the event loop's thread)
    loop_thread = threading.current_thread()
    real_unpack, real_take = batches.unpack_read, BlobCheck.take

    def unpack(response, *args, **kwargs):
        where.append(("batch", response.ByteSize(), threading.current_thread() is loop_thread))
        return real_unpack(response, *args, **kwargs)

    def take(self, data):
        where.append(("stream", len(data), threading.current_thread() is loop_thread))
        return real_take(self, data)

    monkeypatch.setattr(batches, "unpack_read", unpack)
    monkeypatch.setattr(BlobCheck, "take", take)
    cas = await CasClient.connect(channel) if compressed else CasClient(channel)
    blobs = {digest_of(d): d for d in (os.urandom(100 * KiB) for _ in range(20))}
    tiny = b"tiny"
    large = os.urandom(5 * MiB)
    blobs |= {digest_of(tiny): tiny, digest_of(large): large}
    await cas.upload(blobs)

    assert await cas.read_many(blobs) == blobs
    assert await cas.read(digest_of(tiny)) == tiny

    big_batches = [on_loop for what, size, on_loop in where if what == "batch" and size > MiB]
    streamed = [(size, on_loop) for what, size, on_loop in where if what == "stream"]
    assert big_batches and not any(big_batches)
    assert sum(size for size, _ in streamed) >= (1 if compressed else len(large))
    assert all(not on_loop for size, on_loop in streamed if size >= INLINE_CHECK_BYTES)
    assert ("batch", True) in {(what, on_loop) for what, size, on_loop in where if size < 1000}


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "zstd"])
async def test_resume_upload_continues_a_broken_stream_at_its_offset(
    server: ServerApp, channel, tmp_path: Path, compressed: bool
):
    data = os.urandom(MiB) + compressible(2 * MiB + 17)
    digest = digest_of(data)
    source = tmp_path / "blob.bin"
    source.write_bytes(data)
    cas = await CasClient.connect(channel) if compressed else CasClient(channel)
    name = cas.upload_resource_name(digest)
    assert upload_key(name) == (digest, compressed)
    # Half the stream the client would send, then the connection "drops".
    stream = zstd(data) if compressed else data
    committed = await break_write(
        server.store,
        bytestream_pb2_grpc.ByteStreamStub(channel),
        name,
        stream[: len(stream) // 2],
        128 * KiB,
    )
    assert 0 < committed < digest.size_bytes
    if not compressed:
        assert committed == len(stream) // 2

    assert await cas.resume_upload(name, source) == committed
    assert await stored(server, digest) == data
    # Finished: resuming again sends nothing and says so.
    assert await cas.resume_upload(name, data) == digest.size_bytes


async def test_resume_upload_of_an_unknown_upload_sends_it_whole(server: ServerApp, channel):
    cas = await CasClient.connect(channel)
    data = compressible(3 * MiB)
    name = cas.upload_resource_name(digest_of(data))
    assert await cas.resume_upload(name, data) == 0
    assert await stored(server, digest_of(data)) == data
    with pytest.raises(InvalidArgument, match="is not of the form"):
        await cas.resume_upload(f"blobs/{digest_of(data).hash}/{len(data)}", data)
    wrong = os.urandom(3 * MiB)
    with pytest.raises(InvalidArgument):
        await cas.resume_upload(cas.upload_resource_name(digest_of(data + b"!")), wrong)


class CuttingProxy:
    """A TCP relay to the server whose first connection stalls once `cut_after` bytes came
    from the client and is then aborted, like a network link that hangs and drops; later
    connections are relayed whole. The stall lets the server take in what it received, so
    it commits every whole Write message (1 MiB) that crossed before the cut."""

    def __init__(self, server: ServerApp, cut_after: int) -> None:
        self.server = server
        self.upstream_port = server.port
        self.cut_after = cut_after
        self.connections = 0
        self.upstream_bytes = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cut = self.connections == 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]
        forwarded = 0

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool):
            nonlocal forwarded
            with contextlib.suppress(ConnectionError):
                while data := await src.read(64 * KiB):
                    if upstream:
                        self.upstream_bytes += len(data)
                        forwarded += len(data)
                        if cut and forwarded > self.cut_after:
                            await self._server_took_whole_messages()
                            writer.transport.abort()
                            up_writer.transport.abort()
                            return
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    async def _server_took_whole_messages(self) -> None:
        whole = self.cut_after // MiB * MiB  # offset after the last whole message that crossed
        sessions = self.server.store._uploads._sessions  # the server runs in this process
        await wait_until(
            lambda: any(s.next_offset >= whole for s in sessions.values()),
            what=f"the server to take the first {whole} bytes",
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()
            for writer in self._writers:
                writer.transport.abort()
            await server.wait_closed()


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "zstd"])
async def test_upload_resumes_after_the_connection_drops(server: ServerApp, compressed: bool):
    data = os.urandom(5 * MiB)  # over the 4 MiB batch limit: ByteStream
    digest = digest_of(data)
    proxy = CuttingProxy(server, cut_after=5 * MiB // 2)
    async with proxy.running() as target, open_channel(target) as channel:
        cas = CasClient(channel, compressor=ZSTD if compressed else IDENTITY)
        assert await cas.upload({digest: data}) == digest.size_bytes
    assert await stored(server, digest) == data
    assert proxy.connections >= 2
    # Had the upload started over, 2.5 MiB plus the whole blob would have crossed the
    # proxy; it continued from what the server had committed instead.
    assert 5 * MiB < proxy.upstream_bytes < 6 * MiB


# -- GetTree ----------------------------------------------------------------------------------


def deep_tree(root: Path) -> int:
    """3 levels: 4 directories of 8 subdirectories, each with its own file; 37 in all."""
    for i in range(4):
        for j in range(8):
            leaf = root / f"d{i}" / f"s{j}"
            leaf.mkdir(parents=True)
            (leaf / "f.txt").write_bytes(f"file {i}/{j}\n".encode())
        (root / f"d{i}" / "top.txt").write_bytes(f"top {i}\n".encode())
    return 1 + 4 + 4 * 8


def directory_digests(tree) -> set[Digest]:
    return {d for d, blob in tree.blobs.items() if isinstance(blob, bytes)}


async def test_get_tree_follows_pages_over_a_deep_tree(server: ServerApp, channel, tmp_path: Path):
    count = deep_tree(tmp_path / "src")
    tree = await asyncio.to_thread(merkle_tree_from_directory, tmp_path / "src")
    cas = await CasClient.connect(channel)
    await cas.upload(tree.blobs)

    pages = [page async for page in cas.tree_pages(tree.root_digest, page_size=4)]
    assert all(len(page) <= 4 for page in pages)
    assert len(pages) >= count // 4
    directories = [d for page in pages for d in page]
    got = [digest_of(d.SerializeToString(deterministic=True)) for d in directories]
    assert got[0] == tree.root_digest
    assert len(got) == count and set(got) == directory_digests(tree)
    assert await cas.get_tree(tree.root_digest, page_size=4) == directories

    out = tmp_path / "out"
    await materialize(cas, tree.root_digest, out)
    assert (out / "d3" / "s7" / "f.txt").read_bytes() == b"file 3/7\n"
    assert (out / "d0" / "top.txt").read_bytes() == b"top 0\n"
    assert sum(1 for p in out.rglob("*") if p.is_dir()) == count - 1


async def test_missing_subdirectory_is_left_out_and_reported_missing(
    server: ServerApp, channel, tmp_path: Path
):
    count = deep_tree(tmp_path / "src")
    tree = await asyncio.to_thread(merkle_tree_from_directory, tmp_path / "src")
    cas = await CasClient.connect(channel)
    d2 = merkle_tree_from_directory(tmp_path / "src" / "d2")
    # Everything but the Directory message of d2 (its subdirectories are uploaded).
    await cas.upload({d: blob for d, blob in tree.blobs.items() if d != d2.root_digest})

    directories = await cas.get_tree(tree.root_digest, page_size=5)
    got = {digest_of(d.SerializeToString(deterministic=True)) for d in directories}
    # GetTree leaves out d2 and, unreachable through it, its 8 subdirectories.
    assert got == directory_digests(tree) - directory_digests(d2)
    assert len(got) == count - 9

    with pytest.raises(FailedPrecondition) as raised:
        await materialize(cas, tree.root_digest, tmp_path / "out")
    (violation,) = raised.value.violations
    assert violation.type == "MISSING"
    assert violation.subject == f"blobs/{d2.root_digest.hash}/{d2.root_digest.size_bytes}"
    assert "'d2'" in violation.description

    absent_root = digest_of(b"no such directory")
    with pytest.raises(NotFound, match=absent_root.hash):
        await cas.get_tree(absent_root)
    with pytest.raises(FailedPrecondition) as raised:
        await materialize(cas, absent_root, tmp_path / "out2")
    assert [v.subject for v in raised.value.violations] == [
        f"blobs/{absent_root.hash}/{absent_root.size_bytes}"
    ]


# -- run_command --------------------------------------------------------------------------------


@pytest.fixture
async def worker(server, tmp_path) -> AsyncIterator[WorkerAgent]:
    async with running_worker(server, tmp_path / "work", name="worker-transfers", slots=1) as agent:
        yield agent


def cas_bytes_served() -> float:
    return sum(
        REGISTRY.get_sample_value("expbuild_cas_bytes_read_total", {"method": method}) or 0.0
        for method in ("BatchReadBlobs", "ByteStream.Read")
    )


async def test_run_command_downloads_outputs_compressed(server, worker, tmp_path: Path):
    size = 6 * MiB
    before = cas_bytes_served()
    result = await run_command(
        target_of(server),
        ["sh", "-c", f"head -c {size} /dev/zero > zeros.bin"],
        outputs=["zeros.bin"],
        download_to=tmp_path / "out",
    )
    assert result.exit_code == 0
    assert (tmp_path / "out" / "zeros.bin").read_bytes() == bytes(size)
    # The 6 MiB output was served as zstd: a few hundred bytes, not megabytes.
    assert cas_bytes_served() - before < 64 * KiB
