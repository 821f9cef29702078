"""ByteStream Read and Write of one blob, each over one or more streams.

A read broken by UNAVAILABLE after some data arrived resumes at the offset reached. A
write sends one stream from a given offset; continuing a broken one is
`expbuild.client.resume`'s job. Offsets follow REAPI: uncompressed, each message's
write_offset is where its data goes in the blob; compressed, a stream starts at an
uncompressed offset and each later message at that plus the compressed bytes sent before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import grpc
from google.rpc import code_pb2

from expbuild.client.errors import from_rpc_error
from expbuild.client.files import CHUNK_BYTES, local_chunks
from expbuild.client.integrity import INLINE_CHECK_BYTES, BlobCheck
from expbuild.digest import Digest
from expbuild.errors import InvalidArgument, RemoteError
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc
from expbuild.reapi.compression import StreamCompressor

READ_RESUME_ATTEMPTS = 3
"""A broken read (or GetTree stream) resumes at most this many times in a row."""


def backoff(failures: int) -> float:
    return 0.5 * 2**failures


async def read(
    stub: bytestream_pb2_grpc.ByteStreamStub,
    target: str | None,
    resource: str,
    digest: Digest,
    compressed: bool,
) -> AsyncGenerator[bytes, None]:
    """The blob's uncompressed bytes read from `resource` (a `compressed-blobs/zstd/...`
    name if `compressed`), resuming after a dropped connection. After the last piece,
    raises DATA_LOSS unless everything hashed to `digest`, so a consumer never completes
    on corrupt data. Decoding and hashing of each large message run in a thread."""
    check = BlobCheck(digest, compressed)
    failures = 0
    while True:
        request = bytestream_pb2.ReadRequest(resource_name=resource, read_offset=check.received)
        check.restart()
        call = stub.Read(request)
        try:
            async for response in call:
                data = response.data
                if not data:
                    continue
                if len(data) < INLINE_CHECK_BYTES:
                    pieces = check.take(data)
                else:
                    pieces = await asyncio.to_thread(check.take, data)
                if pieces:
                    failures = 0
                for piece in pieces:
                    yield piece
            break
        except grpc.aio.AioRpcError as e:
            resumable = e.code() == grpc.StatusCode.UNAVAILABLE and check.received > 0
            if not resumable or failures >= READ_RESUME_ATTEMPTS:
                raise from_rpc_error(e, target, f"reading blob {digest}") from None
            failures += 1
            await asyncio.sleep(backoff(failures))
        finally:
            call.cancel()
    check.finish()


async def _compressed_chunks(
    source: bytes | Path, digest: Digest, offset: int, problem: list[str]
) -> AsyncGenerator[bytes, None]:
    """The blob from `offset` to its end as one new zstd frame, in pieces of at most
    `CHUNK_BYTES`."""
    stream = StreamCompressor(digest.size_bytes - offset, CHUNK_BYTES)
    local = local_chunks(source, digest.size_bytes, problem, offset)
    async with contextlib.aclosing(local) as chunks:
        async for chunk in chunks:
            for piece in await asyncio.to_thread(stream.compress, chunk):
                yield piece
    if problem:
        return  # the frame would not match its declared size; the stream is failing anyway
    for piece in stream.flush():
        yield piece


async def write(
    stub: bytestream_pb2_grpc.ByteStreamStub,
    resource: str,
    digest: Digest,
    compressed: bool,
    source: bytes | Path,
    offset: int,
    what: str,
) -> None:
    """One Write stream sending the blob from uncompressed `offset` to its end.

    Raises AioRpcError for the caller to decide on resuming, `InvalidArgument` when
    `source` does not match its digest.
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
            chunks = _compressed_chunks(source, digest, offset, problem)
        else:
            chunks = local_chunks(source, digest.size_bytes, problem, offset)
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
        response = await stub.Write(requests())
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
            code_pb2.DATA_LOSS,
            f"uploading {what}: the server committed {response.committed_size} "
            f"of {digest.size_bytes} bytes",
        )


__all__ = ["READ_RESUME_ATTEMPTS", "backoff", "read", "write"]
