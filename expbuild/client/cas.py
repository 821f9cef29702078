"""Moving blobs to and from a remote Content Addressable Storage.

Small blobs travel in BatchUpdateBlobs / BatchReadBlobs requests, large ones through
ByteStream Write / Read in 1 MiB chunks, so memory use stays bounded by the batch size and
the number of concurrent transfers. Everything read is checked against its digest.

With zstd on (`CasClient.connect` turns it on when the server offers it), blobs of at
least `ZSTD_MIN_BYTES` travel compressed: through `compressed-blobs/zstd/...` ByteStream
resources and as ZSTD entries of batches; the CAS itself always holds (and digests name)
the uncompressed bytes. A ByteStream upload whose stream breaks is continued from where
QueryWriteStatus says the server got to.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import grpc
import zstandard

from expbuild.client.capabilities import fetch_capabilities
from expbuild.client.channel import MAX_MESSAGE_BYTES, channel_target
from expbuild.client.errors import RemoteError, from_rpc_error, from_status
from expbuild.digest import Digest, new_hasher
from expbuild.errors import InvalidArgument, NotFound
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc

T = TypeVar("T")

MiB = 1024 * 1024
DEFAULT_MAX_BATCH_BYTES = 4 * MiB
BYTESTREAM_CHUNK_BYTES = 1 * MiB
FIND_MISSING_BATCH = 10_000
DEFAULT_CONCURRENCY = 8
DEFAULT_TREE_PAGE_SIZE = 0  # let the server choose
ZSTD_MIN_BYTES = 1024
"""Smaller blobs travel uncompressed even with zstd on: the frame overhead and the CPU
spent would buy next to nothing."""

IDENTITY = re_pb2.Compressor.IDENTITY
ZSTD = re_pb2.Compressor.ZSTD

# What a batch entry costs on the wire besides its data: the Digest message (64-char hash,
# varint size) plus tags and length prefixes, rounded up generously.
_ENTRY_OVERHEAD = 160
# The request envelope: instance name, digest_function, the outer length prefixes.
_REQUEST_OVERHEAD = 1024
# A ByteStream Read broken by UNAVAILABLE after some data arrived is resumed at the
# offset reached, at most this many times in a row; likewise a GetTree stream from its
# last page token.
_READ_RESUME_ATTEMPTS = 3
# A ByteStream Write broken by one of these codes is continued after QueryWriteStatus, at
# most this many times without the server's committed size moving forward.
_WRITE_RESUME_ATTEMPTS = 3
_RESUMABLE_WRITE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
_ZSTD_LEVEL = 3
# Largest piece of output zstd hands over at once when decoding: an oversize (or hostile)
# stream is stopped after at most this much more than the blob's size.
_DECODE_PIECE_BYTES = 256 * 1024
_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


async def gather_or_cancel(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Await all of `aws` concurrently and return their results in order.

    Unlike `asyncio.gather`, the first failure cancels the others (and waits for them to
    finish) before it is raised as is, so no transfer outlives its caller and callers see
    a plain exception rather than an ExceptionGroup.
    """
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    if not tasks:
        return []
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _verify(digest: Digest, data: bytes) -> None:
    hasher = new_hasher()
    hasher.update(data)
    _check_hash(digest, len(data), hasher.hexdigest())


def _check_hash(digest: Digest, size: int, actual_hash: str) -> None:
    if size != digest.size_bytes or actual_hash != digest.hash:
        raise RemoteError(
            grpc.StatusCode.DATA_LOSS,
            f"blob {digest} sent by the server is corrupt: got {size} bytes hashing to "
            f"{actual_hash}",
        )


def _read_local(digest: Digest, source: bytes | Path) -> bytes:
    """The bytes of a small blob to upload, refusing a file that changed since it was hashed."""
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        data = f.read(digest.size_bytes + 1)
    if len(data) != digest.size_bytes:
        raise InvalidArgument(
            f"{source} changed after it was hashed: it has {len(data)} bytes now, "
            f"blob {digest} expects {digest.size_bytes}"
        )
    return data


def _compressor_name(value: int) -> str:
    try:
        return re_pb2.Compressor.Value.Name(value)
    except ValueError:
        return f"compressor #{value}"


def _backoff(failures: int) -> float:
    return 0.5 * 2**failures


class _Collected:
    """The file-like sink zstd's stream_writer writes decoded output into."""

    def __init__(self, digest: Digest, room: int) -> None:
        self.pieces: list[bytes] = []
        self._digest = digest
        self._room = room

    def write(self, piece) -> int:
        self._room -= len(piece)
        if self._room < 0:
            raise RemoteError(
                grpc.StatusCode.DATA_LOSS,
                f"blob {self._digest}: the server sent data decompressing to more than "
                f"{self._digest.size_bytes} bytes",
            )
        self.pieces.append(bytes(piece))
        return len(piece)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _ZstdDecoder:
    """Streaming zstd decoding of a blob from `offset` to its end (one or more frames).

    Output beyond the blob's end raises DATA_LOSS as soon as it appears, so a
    decompression bomb costs at most one piece. Blocking: feed large data from a thread.
    """

    def __init__(self, digest: Digest, offset: int = 0) -> None:
        self._digest = digest
        self._sink = _Collected(digest, digest.size_bytes - offset)
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            self._sink, write_size=_DECODE_PIECE_BYTES, write_return_read=True
        )

    def feed(self, data: bytes) -> list[bytes]:
        """The decoded pieces that `data` (the next compressed bytes) completes."""
        try:
            self._writer.write(data)
        except zstandard.ZstdError as e:
            raise RemoteError(
                grpc.StatusCode.DATA_LOSS,
                f"blob {self._digest}: the server sent data that is not valid zstd ({e})",
            ) from None
        pieces, self._sink.pieces = self._sink.pieces, []
        return pieces


def _zstd_decompress(digest: Digest, data: bytes) -> bytes:
    return b"".join(_ZstdDecoder(digest).feed(data))


def parse_upload_resource(resource_name: str) -> tuple[Digest, bool]:
    """(digest, compressed) of a ByteStream upload name:
    `[{instance}/]uploads/{uuid}/blobs/{hash}/{size}[/...]` or
    `[{instance}/]uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}[/...]`.

    Raises `InvalidArgument` for anything else (including other compressors).
    """
    segments = resource_name.split("/")
    forms = (
        "'[{instance}/]uploads/{uuid}/blobs/{hash}/{size}' or "
        "'[{instance}/]uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}'"
    )
    if "uploads" not in segments:
        raise InvalidArgument(f"{resource_name!r} is not an upload resource name; expected {forms}")
    rest = segments[segments.index("uploads") + 2 :]
    compressed = rest[:2] == ["compressed-blobs", "zstd"]
    if compressed:
        rest = rest[2:]
    elif rest[:1] == ["blobs"]:
        rest = rest[1:]
    else:
        raise InvalidArgument(f"{resource_name!r} is not an upload resource name; expected {forms}")
    if rest[:1] == ["sha256"]:  # REAPI 2.3's digest-function segment
        rest = rest[1:]
    if len(rest) < 2 or not rest[1].isdigit():
        raise InvalidArgument(f"{resource_name!r} is not an upload resource name; expected {forms}")
    return Digest(rest[0], int(rest[1])), compressed


class CasClient:
    """ContentAddressableStorage and ByteStream calls for one instance of one server.

    All methods are coroutines that may run concurrently; at most `concurrency` RPCs are
    in flight per client. Failures raise `ExpBuildError` subclasses (see
    `expbuild.client.errors`), never gRPC exceptions. `max_batch_bytes` should not exceed
    the server's `max_batch_total_size_bytes`; blobs that do not fit in a batch of that
    size go through ByteStream. `compressor` (IDENTITY or ZSTD) is how blobs of at least
    `ZSTD_MIN_BYTES` travel; the server must support it (see `connect`, which asks).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        instance_name: str = "",
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        compressor: re_pb2.Compressor.Value = IDENTITY,
    ):
        if compressor not in (IDENTITY, ZSTD):
            raise ValueError(f"compressor {compressor} is not supported; use IDENTITY or ZSTD")
        self.instance_name = instance_name
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
        self._target = channel_target(channel)
        self._max_batch_bytes = max_batch_bytes
        self._batch_budget = max_batch_bytes - _REQUEST_OVERHEAD - len(instance_name.encode())
        if self._batch_budget <= _ENTRY_OVERHEAD:
            raise ValueError(f"max_batch_bytes={max_batch_bytes} is too small for any batch")
        self._rpc_slots = asyncio.Semaphore(concurrency)
        # ByteStream and BatchReadBlobs use `_compressor`; BatchUpdateBlobs entries use
        # `_batch_update_compressor`, which servers announce separately.
        self._compressor = compressor
        self._batch_update_compressor = compressor

    @classmethod
    async def connect(
        cls,
        channel: grpc.aio.Channel,
        instance_name: str = "",
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> CasClient:
        """A client set up from the server's capabilities for `instance_name`: batches up
        to its `max_batch_total_size_bytes` (`DEFAULT_MAX_BATCH_BYTES` if it gives none),
        zstd wherever it supports it.

        Raises `InvalidArgument` naming the instance if the server does not serve it.
        """
        cache = (await fetch_capabilities(channel, instance_name)).cache_capabilities
        # 0 means "no limit"; the channel's message size limit still applies.
        limit = min(cache.max_batch_total_size_bytes or DEFAULT_MAX_BATCH_BYTES, MAX_MESSAGE_BYTES)
        tiny = limit - _REQUEST_OVERHEAD - len(instance_name.encode()) <= _ENTRY_OVERHEAD
        client = cls(
            channel,
            instance_name,
            DEFAULT_MAX_BATCH_BYTES if tiny else limit,
            concurrency=concurrency,
            compressor=ZSTD if ZSTD in cache.supported_compressors else IDENTITY,
        )
        if tiny:
            # No batch fits under the server's limit: every blob goes through ByteStream.
            client._max_batch_bytes, client._batch_budget = limit, 0
        if ZSTD not in cache.supported_batch_update_compressors:
            client._batch_update_compressor = IDENTITY
        return client

    @property
    def max_batch_bytes(self) -> int:
        """The largest batch request this client sends."""
        return self._max_batch_bytes

    @property
    def compressor(self) -> re_pb2.Compressor.Value:
        """How blobs of at least `ZSTD_MIN_BYTES` travel through ByteStream and BatchReadBlobs."""
        return self._compressor

    @property
    def batch_update_compressor(self) -> re_pb2.Compressor.Value:
        """How blobs of at least `ZSTD_MIN_BYTES` travel in BatchUpdateBlobs."""
        return self._batch_update_compressor

    # -- shared plumbing --------------------------------------------------------------

    @contextlib.contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, self._target) from None

    def fits_in_batch(self, digest: Digest) -> bool:
        """Whether the blob travels in Batch* requests (True) or through ByteStream."""
        return digest.size_bytes + _ENTRY_OVERHEAD <= self._batch_budget

    def _compresses(self, digest: Digest) -> bool:
        return self._compressor == ZSTD and digest.size_bytes >= ZSTD_MIN_BYTES

    def _batches(self, digests: Iterable[Digest]) -> list[list[Digest]]:
        """Group small digests so each group's data plus overhead stays within the budget."""
        batches: list[list[Digest]] = []
        current: list[Digest] = []
        used = 0
        for digest in digests:
            cost = digest.size_bytes + _ENTRY_OVERHEAD
            if current and used + cost > self._batch_budget:
                batches.append(current)
                current, used = [], 0
            current.append(digest)
            used += cost
        if current:
            batches.append(current)
        return batches

    def _prefix(self) -> str:
        return f"{self.instance_name}/" if self.instance_name else ""

    def _blob_resource(self, digest: Digest, compressed: bool = False) -> str:
        kind = "compressed-blobs/zstd" if compressed else "blobs"
        return f"{self._prefix()}{kind}/{digest.hash}/{digest.size_bytes}"

    def upload_resource_name(self, digest: Digest, *, compressed: bool | None = None) -> str:
        """A fresh ByteStream Write resource name for `digest` (a new uuid each call).

        `compressed` defaults to what this client does with the blob (zstd if it is on
        and the blob is not tiny).
        """
        if compressed is None:
            compressed = self._compresses(digest)
        kind = "compressed-blobs/zstd" if compressed else "blobs"
        return f"{self._prefix()}uploads/{uuid.uuid4()}/{kind}/{digest.hash}/{digest.size_bytes}"

    # -- FindMissingBlobs -------------------------------------------------------------

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The subset of `digests` absent from the CAS, without duplicates, in input order.

        The empty blob is never reported missing (every REAPI CAS holds it implicitly).
        """
        wanted = [d for d in dict.fromkeys(digests) if not d.is_empty]
        chunks = [
            wanted[i : i + FIND_MISSING_BATCH] for i in range(0, len(wanted), FIND_MISSING_BATCH)
        ]
        answers = await gather_or_cancel(self._find_missing_chunk(chunk) for chunk in chunks)
        missing = {d for answer in answers for d in answer}
        return [d for d in wanted if d in missing]

    async def _find_missing_chunk(self, digests: list[Digest]) -> list[Digest]:
        request = re_pb2.FindMissingBlobsRequest(
            instance_name=self.instance_name,
            blob_digests=[d.to_proto() for d in digests],
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        async with self._rpc_slots:
            with self._translated_errors():
                response = await self._cas.FindMissingBlobs(request)
        return [Digest.from_proto(d) for d in response.missing_blob_digests]

    # -- uploads ----------------------------------------------------------------------

    async def upload(self, blobs: Mapping[Digest, bytes | Path]) -> int:
        """Upload the blobs the CAS lacks; return how many bytes were sent.

        A `Path` value is read (or streamed, if large) from disk at upload time; it must
        still have the content its digest was computed from, otherwise `InvalidArgument`
        naming the file is raised. A blob the server refuses raises the error matching the
        server's status, with a message naming the digest. (The count is of uncompressed
        bytes, whatever travelled on the wire.)
        """
        missing = await self.find_missing(blobs.keys())
        small = [d for d in missing if self.fits_in_batch(d)]
        large = [d for d in missing if not self.fits_in_batch(d)]
        jobs: list[Awaitable[None]] = [
            self._upload_batch([(d, blobs[d]) for d in batch]) for batch in self._batches(small)
        ]
        jobs += [self._write(d, blobs[d]) for d in large]
        await gather_or_cancel(jobs)
        return sum(d.size_bytes for d in missing)

    def _pack_batch(
        self, items: list[tuple[Digest, bytes | Path]]
    ) -> list[re_pb2.BatchUpdateBlobsRequest.Request]:
        """The batch entries, zstd-compressed where that is on and pays off. Blocking."""
        cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        entries = []
        for digest, source in items:
            data, compressor = _read_local(digest, source), IDENTITY
            if self._batch_update_compressor == ZSTD and digest.size_bytes >= ZSTD_MIN_BYTES:
                packed = cctx.compress(data)
                # Incompressible data grows a little; such a blob is better sent as is.
                if len(packed) < len(data):
                    data, compressor = packed, ZSTD
            entries.append(
                re_pb2.BatchUpdateBlobsRequest.Request(
                    digest=digest.to_proto(), data=data, compressor=compressor
                )
            )
        return entries

    async def _upload_batch(self, items: list[tuple[Digest, bytes | Path]]) -> None:
        # The slot is taken before reading the files so that at most `concurrency`
        # batches are held in memory at once.
        async with self._rpc_slots:
            # One thread hop reads (and compresses) every file of the batch.
            entries = await asyncio.to_thread(self._pack_batch, items)
            request = re_pb2.BatchUpdateBlobsRequest(
                instance_name=self.instance_name,
                requests=entries,
                digest_function=re_pb2.DigestFunction.SHA256,
            )
            del entries
            with self._translated_errors():
                response = await self._cas.BatchUpdateBlobs(request)
        sources = dict(items)
        answered: set[Digest] = set()
        for entry in response.responses:
            digest = Digest.from_proto(entry.digest)
            answered.add(digest)
            if entry.status.code != 0:
                source = sources.get(digest)
                what = f"{source} (blob {digest})" if isinstance(source, Path) else f"blob {digest}"
                raise from_status(entry.status, f"uploading {what}")
        unanswered = [d for d, _ in items if d not in answered]
        if unanswered:
            raise RemoteError(
                grpc.StatusCode.INTERNAL,
                f"uploading blob {unanswered[0]}: the server's BatchUpdateBlobs response "
                f"does not mention it ({len(unanswered)} blob(s) unanswered)",
            )

    async def _write(self, digest: Digest, source: bytes | Path) -> None:
        resource = self.upload_resource_name(digest)
        async with self._rpc_slots:
            await self._upload_resumably(
                resource, digest, self._compresses(digest), source, resume=False
            )

    async def resume_upload(self, resource_name: str, source: bytes | Path) -> int:
        """Finish the ByteStream upload `resource_name` (an upload name, compressed or not)
        that an earlier Write stream left unfinished, sending only what the server lacks.

        Asks QueryWriteStatus how much is committed and streams the rest of `source` (the
        blob's bytes, or a file holding them) from there; for a compressed upload the rest
        goes as a fresh zstd stream starting at that uncompressed offset, as REAPI says.
        Broken streams are continued the same way, a bounded number of times. Returns the
        committed size found at the start (the blob's size if the upload was complete).

        Raises `InvalidArgument` for a name that is not an upload name, for `source` not
        matching its digest, or when the server refuses the data.
        """
        digest, compressed = parse_upload_resource(resource_name)
        async with self._rpc_slots:
            return await self._upload_resumably(
                resource_name, digest, compressed, source, resume=True
            )

    async def _upload_resumably(
        self,
        resource: str,
        digest: Digest,
        compressed: bool,
        source: bytes | Path,
        *,
        resume: bool,
    ) -> int:
        """Write the blob under `resource`, from the committed offset if `resume`, and keep
        going after broken streams. Returns the offset the first stream started at."""
        what = f"{source} (blob {digest})" if isinstance(source, Path) else f"blob {digest}"
        started_at: int | None = None
        reached = -1 if resume else 0  # the highest committed size QueryWriteStatus reported
        failures = 0
        while True:
            try:
                offset = 0
                if resume:
                    status = await self._bytestream.QueryWriteStatus(
                        bytestream_pb2.QueryWriteStatusRequest(resource_name=resource)
                    )
                    if status.complete or status.committed_size == -1:
                        return digest.size_bytes if started_at is None else started_at
                    offset = status.committed_size
                    if not 0 <= offset <= digest.size_bytes:
                        raise RemoteError(
                            grpc.StatusCode.INTERNAL,
                            f"uploading {what}: QueryWriteStatus reports {offset} bytes "
                            f"committed of {digest.size_bytes}",
                        )
                    if offset > reached:  # progress: the attempts count afresh
                        reached, failures = offset, 0
                if started_at is None:
                    started_at = offset
                await self._write_stream(resource, digest, compressed, source, offset, what)
                return started_at
            except grpc.aio.AioRpcError as e:
                if e.code() not in _RESUMABLE_WRITE_CODES or failures >= _WRITE_RESUME_ATTEMPTS:
                    raise from_rpc_error(e, self._target, f"uploading {what}") from None
                failures += 1
                resume = True
                await asyncio.sleep(_backoff(failures))

    async def _write_stream(
        self,
        resource: str,
        digest: Digest,
        compressed: bool,
        source: bytes | Path,
        offset: int,
        what: str,
    ) -> None:
        """One Write stream sending the blob from uncompressed `offset` to its end.

        Offsets follow REAPI: uncompressed, each message's write_offset is where its data
        goes in the blob; compressed, the stream starts at `offset` and each later message
        at that plus the compressed bytes sent before it. Raises AioRpcError for the
        caller to decide on resuming.
        """
        # Set when `source` no longer matches its digest; the stream then ends without
        # finish_write, the server fails the call, and this explains why.
        problem: list[str] = []
        sent = 0  # data bytes in the messages yielded so far

        def message(data: bytes, *, finish: bool) -> bytestream_pb2.WriteRequest:
            nonlocal sent
            request = bytestream_pb2.WriteRequest(
                resource_name="" if sent else resource,
                write_offset=offset + sent,
                data=data,
                finish_write=finish,
            )
            sent += len(data)
            return request

        async def requests() -> AsyncIterator[bytestream_pb2.WriteRequest]:
            if compressed:
                chunks = self._compressed_chunks(source, digest, offset, problem)
            else:
                chunks = self._local_chunks(source, digest.size_bytes, problem, offset)
            # One chunk of lookahead, so that the last one carries finish_write.
            held: bytes | None = None
            async with contextlib.aclosing(chunks) as stream:
                async for chunk in stream:
                    if held is not None:
                        yield message(held, finish=False)
                    held = chunk
            if not problem:
                yield message(held or b"", finish=True)

        try:
            response = await self._bytestream.Write(requests())
        except grpc.aio.AioRpcError:
            if problem:
                raise InvalidArgument(problem[0]) from None
            raise
        if problem:
            raise InvalidArgument(problem[0])
        # -1: the server skipped (the rest of) an upload of a blob it already has. A
        # compressed upload ends at its start offset plus the compressed bytes sent.
        expected = {digest.size_bytes, -1} | ({offset + sent} if compressed else set())
        if response.committed_size not in expected:
            raise RemoteError(
                grpc.StatusCode.DATA_LOSS,
                f"uploading {what}: the server committed {response.committed_size} "
                f"of {digest.size_bytes} bytes",
            )

    async def _compressed_chunks(
        self, source: bytes | Path, digest: Digest, offset: int, problem: list[str]
    ) -> AsyncIterator[bytes]:
        """The blob from `offset` to its end as one new zstd frame, in pieces of at most
        `BYTESTREAM_CHUNK_BYTES`."""
        cobj = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compressobj(
            size=digest.size_bytes - offset
        )
        out = bytearray()
        local = self._local_chunks(source, digest.size_bytes, problem, offset)
        async with contextlib.aclosing(local) as chunks:
            async for chunk in chunks:
                out += await asyncio.to_thread(cobj.compress, chunk)
                while len(out) >= BYTESTREAM_CHUNK_BYTES:
                    yield bytes(out[:BYTESTREAM_CHUNK_BYTES])
                    del out[:BYTESTREAM_CHUNK_BYTES]
        if problem:
            return  # the frame would not match its declared size; the stream is failing anyway
        out += cobj.flush()
        for start in range(0, len(out), BYTESTREAM_CHUNK_BYTES):
            yield bytes(out[start : start + BYTESTREAM_CHUNK_BYTES])

    async def _local_chunks(
        self, source: bytes | Path, size: int, problem: list[str], offset: int = 0
    ) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset` to `size`, in chunks of `BYTESTREAM_CHUNK_BYTES`."""
        if isinstance(source, bytes):
            view = memoryview(source)[offset:size]
            for start in range(0, len(view), BYTESTREAM_CHUNK_BYTES):
                yield bytes(view[start : start + BYTESTREAM_CHUNK_BYTES])
            if len(source) != size:
                problem.append(f"blob data has {len(source)} bytes, its digest says {size}")
            return
        f = await asyncio.to_thread(open, source, "rb")
        try:
            if offset:
                await asyncio.to_thread(f.seek, offset)
            remaining = size - offset
            while remaining > 0:
                chunk = await asyncio.to_thread(f.read, min(BYTESTREAM_CHUNK_BYTES, remaining))
                if not chunk:
                    problem.append(
                        f"{source} changed after it was hashed: it ended after "
                        f"{size - remaining} bytes, its digest says {size}"
                    )
                    return
                remaining -= len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(f.close)

    # -- reads ------------------------------------------------------------------------

    async def read(self, digest: Digest) -> bytes:
        """The blob's bytes, verified against `digest`. The empty digest costs no RPC.

        Raises `NotFound` if the CAS lacks it and `RemoteError` (DATA_LOSS) if what the
        server sends does not hash to `digest`.
        """
        if digest.is_empty:
            return b""
        if self.fits_in_batch(digest):
            return (await self._read_batch([digest], compressed=self._compresses(digest)))[digest]
        async with contextlib.aclosing(self._verified_stream(digest)) as chunks:
            return b"".join([chunk async for chunk in chunks])

    async def read_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The bytes of every digest (duplicates read once), each verified.

        Small blobs are fetched in BatchReadBlobs requests, large ones by ByteStream, all
        concurrently. Holds every blob in memory: use `read_to_file` for big trees.
        Raises `NotFound` for the first blob found missing (see `read_available`).
        """
        found, _ = await self._read_all(digests, missing_ok=False)
        return found

    async def read_available(
        self, digests: Iterable[Digest]
    ) -> tuple[dict[Digest, bytes], list[Digest]]:
        """Like `read_many`, but a blob the CAS lacks does not raise: it is listed in the
        second element instead (without duplicates, in input order), so the caller learns
        of every missing blob at once. Other failures raise as in `read_many`."""
        return await self._read_all(digests, missing_ok=True)

    async def _read_all(
        self, digests: Iterable[Digest], *, missing_ok: bool
    ) -> tuple[dict[Digest, bytes], list[Digest]]:
        wanted = list(dict.fromkeys(digests))
        result: dict[Digest, bytes] = {d: b"" for d in wanted if d.is_empty}
        small = [d for d in wanted if not d.is_empty and self.fits_in_batch(d)]
        large = [d for d in wanted if not d.is_empty and not self.fits_in_batch(d)]
        # Tiny blobs get batches of their own, which ask for no compression.
        packed = [d for d in small if self._compresses(d)]
        plain = [d for d in small if not self._compresses(d)]
        batch_results = await gather_or_cancel(
            [
                *(self._read_batch(b, missing_ok=missing_ok) for b in self._batches(plain)),
                *(
                    self._read_batch(b, missing_ok=missing_ok, compressed=True)
                    for b in self._batches(packed)
                ),
            ]
        )
        for found in batch_results:
            result.update(found)
        read_large = self._read_if_present if missing_ok else self.read
        large_data = await gather_or_cancel(read_large(d) for d in large)
        for digest, data in zip(large, large_data, strict=True):
            if data is not None:
                result[digest] = data
        return result, [d for d in wanted if d not in result]

    async def _read_if_present(self, digest: Digest) -> bytes | None:
        try:
            return await self.read(digest)
        except NotFound:
            return None

    async def _read_batch(
        self, digests: list[Digest], *, missing_ok: bool = False, compressed: bool = False
    ) -> dict[Digest, bytes]:
        """The blobs of one BatchReadBlobs call. With `missing_ok`, blobs the server
        reports NOT_FOUND are left out of the result instead of raising `NotFound`. With
        `compressed`, the server may send zstd entries."""
        request = re_pb2.BatchReadBlobsRequest(
            instance_name=self.instance_name,
            digests=[d.to_proto() for d in digests],
            acceptable_compressors=[ZSTD] if compressed else [],
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        async with self._rpc_slots:
            with self._translated_errors():
                response = await self._cas.BatchReadBlobs(request)
        found: dict[Digest, bytes] = {}
        absent: set[Digest] = set()
        for entry in response.responses:
            digest = Digest.from_proto(entry.digest)
            if entry.status.code == _NOT_FOUND and missing_ok:
                absent.add(digest)
                continue
            if entry.status.code != 0:
                raise from_status(entry.status, f"reading blob {digest}")
            data = entry.data
            if entry.compressor == ZSTD and compressed:
                data = _zstd_decompress(digest, data)
            elif entry.compressor != IDENTITY:
                name = _compressor_name(entry.compressor)
                asked = "zstd" if compressed else "no compression"
                raise RemoteError(
                    grpc.StatusCode.INTERNAL,
                    f"reading blob {digest}: the server sent it compressed with {name} "
                    f"although {asked} was requested",
                )
            _verify(digest, data)
            found[digest] = data
        for digest in digests:
            if digest not in found and digest not in absent:
                raise RemoteError(
                    grpc.StatusCode.INTERNAL,
                    f"reading blob {digest}: the server's BatchReadBlobs response does not "
                    "mention it",
                )
        return found

    async def _verified_stream(self, digest: Digest) -> AsyncIterator[bytes]:
        """`_read_stream`'s chunks; after the last one, raises DATA_LOSS unless they hash
        to `digest`, so a consumer never completes on corrupt data."""
        hasher = new_hasher()
        received = 0
        async with contextlib.aclosing(self._read_stream(digest)) as chunks:
            async for chunk in chunks:
                hasher.update(chunk)
                received += len(chunk)
                yield chunk
        _check_hash(digest, received, hasher.hexdigest())

    async def _read_stream(self, digest: Digest) -> AsyncIterator[bytes]:
        """The blob's (uncompressed) chunks via ByteStream Read, resuming after a dropped
        connection. With zstd on, reads `compressed-blobs/zstd/...` and decodes it.

        The caller verifies the hash; this only guards against receiving too much.
        """
        compressed = self._compresses(digest)
        offset = 0  # uncompressed bytes received: where a resumed read starts
        failures = 0
        async with self._rpc_slots:
            while True:
                request = bytestream_pb2.ReadRequest(
                    resource_name=self._blob_resource(digest, compressed), read_offset=offset
                )
                # A resumed compressed read is a new zstd stream of the rest of the blob.
                decoder = _ZstdDecoder(digest, offset) if compressed else None
                call = self._bytestream.Read(request)
                try:
                    async for response in call:
                        if not response.data:
                            continue
                        if decoder is None:
                            pieces = [response.data]
                        else:
                            pieces = await asyncio.to_thread(decoder.feed, response.data)
                        for piece in pieces:
                            offset += len(piece)
                            failures = 0
                            if offset > digest.size_bytes:
                                raise RemoteError(
                                    grpc.StatusCode.DATA_LOSS,
                                    f"reading blob {digest}: the server sent more than "
                                    f"{digest.size_bytes} bytes",
                                )
                            yield piece
                    return
                except grpc.aio.AioRpcError as e:
                    resumable = e.code() == grpc.StatusCode.UNAVAILABLE and offset > 0
                    if not resumable or failures >= _READ_RESUME_ATTEMPTS:
                        raise from_rpc_error(e, self._target, f"reading blob {digest}") from None
                    failures += 1
                    await asyncio.sleep(_backoff(failures))
                finally:
                    call.cancel()

    async def read_to_file(self, digest: Digest, path: Path, executable: bool = False) -> None:
        """Write the blob to `path` (mode 0o755 if `executable`, else 0o644).

        Large blobs are streamed to disk, never held in memory. The file appears only once
        complete and verified (written under a temporary name in the same directory, then
        renamed over any existing file); parent directories are created as needed. On
        failure nothing is left behind.
        """
        mode = 0o755 if executable else 0o644
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.expbuild-{uuid.uuid4().hex}")
        try:
            if digest.is_empty or self.fits_in_batch(digest):
                data = await self.read(digest)
                await asyncio.to_thread(_write_new_file, temp, data, mode)
            else:
                await self._stream_to_file(digest, temp)
            await asyncio.to_thread(_finish_file, temp, path, mode)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise

    async def _stream_to_file(self, digest: Digest, temp: Path) -> None:
        f = await asyncio.to_thread(open, temp, "xb")
        try:
            # aclosing: a failed write must release the stream's RPC slot right away.
            async with contextlib.aclosing(self._verified_stream(digest)) as chunks:
                async for chunk in chunks:
                    await asyncio.to_thread(f.write, chunk)
        finally:
            await asyncio.to_thread(f.close)

    # -- GetTree ----------------------------------------------------------------------

    async def tree_pages(
        self, root_digest: Digest, *, page_size: int = DEFAULT_TREE_PAGE_SIZE
    ) -> AsyncIterator[list[re_pb2.Directory]]:
        """The Directory messages of the tree rooted at `root_digest`, one GetTree page
        (at most `page_size` directories; 0 lets the server choose) at a time.

        The root comes first; each directory appears once however often it is
        referenced. Directories the CAS lacks are left out with everything below them
        (REAPI's rule: compare the DirectoryNodes with what came back to find them); a
        missing root raises `NotFound`. A stream the server ends with a next_page_token is
        continued by a new call, and one dropped with UNAVAILABLE is resumed from the
        last token received.
        """
        if root_digest.is_empty:  # the empty Directory serializes to nothing
            yield [re_pb2.Directory()]
            return
        token = ""
        failures = 0
        async with self._rpc_slots:
            while True:
                request = re_pb2.GetTreeRequest(
                    instance_name=self.instance_name,
                    root_digest=root_digest.to_proto(),
                    page_size=page_size,
                    page_token=token,
                    digest_function=re_pb2.DigestFunction.SHA256,
                )
                call = self._cas.GetTree(request)
                try:
                    async for response in call:
                        token = response.next_page_token
                        failures = 0
                        yield list(response.directories)
                    if not token:
                        return
                    if token == request.page_token:
                        raise RemoteError(
                            grpc.StatusCode.INTERNAL,
                            f"reading the tree of {root_digest}: GetTree returned nothing "
                            "past its page token",
                        )
                except grpc.aio.AioRpcError as e:
                    resumable = e.code() == grpc.StatusCode.UNAVAILABLE and bool(token)
                    if not resumable or failures >= _READ_RESUME_ATTEMPTS:
                        raise from_rpc_error(
                            e, self._target, f"reading the tree of {root_digest}"
                        ) from None
                    failures += 1
                    await asyncio.sleep(_backoff(failures))
                finally:
                    call.cancel()

    async def get_tree(
        self, root_digest: Digest, page_size: int = DEFAULT_TREE_PAGE_SIZE
    ) -> list[re_pb2.Directory]:
        """Every Directory of the tree rooted at `root_digest`, following GetTree's pages
        (see `tree_pages`: missing directories are left out, a missing root raises
        `NotFound`). Holds the whole tree's Directory messages in memory."""
        directories: list[re_pb2.Directory] = []
        async with contextlib.aclosing(self.tree_pages(root_digest, page_size=page_size)) as pages:
            async for page in pages:
                directories.extend(page)
        return directories


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    with open(path, "xb") as f:
        f.write(data)


def _finish_file(temp: Path, path: Path, mode: int) -> None:
    # chmod, not the umask-filtered open() mode: the executable bit must survive any umask.
    os.chmod(temp, mode)
    os.replace(temp, path)
