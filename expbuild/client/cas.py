"""Moving blobs to and from a remote Content Addressable Storage.

Small blobs travel in BatchUpdateBlobs / BatchReadBlobs requests, large ones through
ByteStream Write / Read in 1 MiB chunks, so memory use stays bounded by the batch size and
the number of concurrent transfers. Everything read is checked against its digest.
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

from expbuild.client.channel import channel_target
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

# What a batch entry costs on the wire besides its data: the Digest message (64-char hash,
# varint size) plus tags and length prefixes, rounded up generously.
_ENTRY_OVERHEAD = 160
# The request envelope: instance name, digest_function, the outer length prefixes.
_REQUEST_OVERHEAD = 1024
# A ByteStream Read broken by UNAVAILABLE after some data arrived is resumed at the
# offset reached, at most this many times in a row.
_READ_RESUME_ATTEMPTS = 3
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


class CasClient:
    """ContentAddressableStorage and ByteStream calls for one instance of one server.

    All methods are coroutines that may run concurrently; at most `concurrency` RPCs are
    in flight per client. Failures raise `ExpBuildError` subclasses (see
    `expbuild.client.errors`), never gRPC exceptions. `max_batch_bytes` should not exceed
    the server's `max_batch_total_size_bytes`; blobs that do not fit in a batch of that
    size go through ByteStream.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        instance_name: str = "",
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
    ):
        self.instance_name = instance_name
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
        self._target = channel_target(channel)
        self._batch_budget = max_batch_bytes - _REQUEST_OVERHEAD - len(instance_name.encode())
        if self._batch_budget <= _ENTRY_OVERHEAD:
            raise ValueError(f"max_batch_bytes={max_batch_bytes} is too small for any batch")
        self._rpc_slots = asyncio.Semaphore(concurrency)

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

    def _blob_resource(self, digest: Digest) -> str:
        prefix = f"{self.instance_name}/" if self.instance_name else ""
        return f"{prefix}blobs/{digest.hash}/{digest.size_bytes}"

    def _upload_resource(self, digest: Digest) -> str:
        prefix = f"{self.instance_name}/" if self.instance_name else ""
        return f"{prefix}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"

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
        server's status, with a message naming the digest.
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

    async def _upload_batch(self, items: list[tuple[Digest, bytes | Path]]) -> None:
        # The slot is taken before reading the files so that at most `concurrency`
        # batches are held in memory at once.
        async with self._rpc_slots:
            # One thread hop reads every file of the batch.
            datas = await asyncio.to_thread(lambda: [_read_local(d, src) for d, src in items])
            request = re_pb2.BatchUpdateBlobsRequest(
                instance_name=self.instance_name,
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=data)
                    for (d, _), data in zip(items, datas, strict=True)
                ],
                digest_function=re_pb2.DigestFunction.SHA256,
            )
            del datas
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
        resource = self._upload_resource(digest)
        # Set by the request generator when a file no longer matches its digest; the stream
        # then ends without finish_write, the server fails the call, and this explains why.
        problem: list[str] = []

        async def requests() -> AsyncIterator[bytestream_pb2.WriteRequest]:
            offset = 0
            local = self._local_chunks(source, digest.size_bytes, problem)
            async with contextlib.aclosing(local) as chunks:
                async for chunk in chunks:
                    offset_after = offset + len(chunk)
                    yield bytestream_pb2.WriteRequest(
                        resource_name=resource if offset == 0 else "",
                        write_offset=offset,
                        data=chunk,
                        finish_write=offset_after == digest.size_bytes,
                    )
                    offset = offset_after

        async with self._rpc_slots:
            try:
                response = await self._bytestream.Write(requests())
            except grpc.aio.AioRpcError as e:
                if problem:
                    raise InvalidArgument(problem[0]) from None
                what = f"{source} (blob {digest})" if isinstance(source, Path) else f"blob {digest}"
                raise from_rpc_error(e, self._target, f"uploading {what}") from None
        if problem:
            raise InvalidArgument(problem[0])
        # -1 is what servers answer when they skip the upload of a blob they already have.
        if response.committed_size not in (digest.size_bytes, -1):
            raise RemoteError(
                grpc.StatusCode.DATA_LOSS,
                f"uploading blob {digest}: the server committed {response.committed_size} "
                f"of {digest.size_bytes} bytes",
            )

    async def _local_chunks(
        self, source: bytes | Path, size: int, problem: list[str]
    ) -> AsyncIterator[bytes]:
        if isinstance(source, bytes):
            view = memoryview(source)[:size]
            for start in range(0, len(view), BYTESTREAM_CHUNK_BYTES):
                yield bytes(view[start : start + BYTESTREAM_CHUNK_BYTES])
            if len(source) != size:
                problem.append(f"blob data has {len(source)} bytes, its digest says {size}")
            return
        f = await asyncio.to_thread(open, source, "rb")
        try:
            remaining = size
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
            return (await self._read_batch([digest]))[digest]
        parts: list[bytes] = []
        hasher = new_hasher()
        received = 0
        async with contextlib.aclosing(self._read_stream(digest)) as chunks:
            async for chunk in chunks:
                hasher.update(chunk)
                received += len(chunk)
                parts.append(chunk)
        _check_hash(digest, received, hasher.hexdigest())
        return b"".join(parts)

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
        batch_results = await gather_or_cancel(
            self._read_batch(b, missing_ok=missing_ok) for b in self._batches(small)
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
        self, digests: list[Digest], *, missing_ok: bool = False
    ) -> dict[Digest, bytes]:
        """The blobs of one BatchReadBlobs call. With `missing_ok`, blobs the server
        reports NOT_FOUND are left out of the result instead of raising `NotFound`."""
        request = re_pb2.BatchReadBlobsRequest(
            instance_name=self.instance_name,
            digests=[d.to_proto() for d in digests],
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
            if entry.compressor != re_pb2.Compressor.IDENTITY:
                raise RemoteError(
                    grpc.StatusCode.INTERNAL,
                    f"reading blob {digest}: the server sent it compressed although no "
                    "compression was requested",
                )
            _verify(digest, entry.data)
            found[digest] = entry.data
        for digest in digests:
            if digest not in found and digest not in absent:
                raise RemoteError(
                    grpc.StatusCode.INTERNAL,
                    f"reading blob {digest}: the server's BatchReadBlobs response does not "
                    "mention it",
                )
        return found

    async def _read_stream(self, digest: Digest) -> AsyncIterator[bytes]:
        """The blob's chunks via ByteStream Read, resuming after a dropped connection.

        The caller verifies the hash; this only guards against receiving too much.
        """
        offset = 0
        failures = 0
        async with self._rpc_slots:
            while True:
                request = bytestream_pb2.ReadRequest(
                    resource_name=self._blob_resource(digest), read_offset=offset
                )
                call = self._bytestream.Read(request)
                try:
                    async for response in call:
                        if not response.data:
                            continue
                        offset += len(response.data)
                        failures = 0
                        if offset > digest.size_bytes:
                            raise RemoteError(
                                grpc.StatusCode.DATA_LOSS,
                                f"reading blob {digest}: the server sent more than "
                                f"{digest.size_bytes} bytes",
                            )
                        yield response.data
                    return
                except grpc.aio.AioRpcError as e:
                    resumable = e.code() == grpc.StatusCode.UNAVAILABLE and offset > 0
                    if not resumable or failures >= _READ_RESUME_ATTEMPTS:
                        raise from_rpc_error(e, self._target, f"reading blob {digest}") from None
                    failures += 1
                    await asyncio.sleep(0.5 * 2**failures)
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
            hasher = new_hasher()
            received = 0
            # aclosing: a failed write must release the stream's RPC slot right away.
            async with contextlib.aclosing(self._read_stream(digest)) as chunks:
                async for chunk in chunks:
                    hasher.update(chunk)
                    received += len(chunk)
                    await asyncio.to_thread(f.write, chunk)
            _check_hash(digest, received, hasher.hexdigest())
        finally:
            await asyncio.to_thread(f.close)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    with open(path, "xb") as f:
        f.write(data)


def _finish_file(temp: Path, path: Path, mode: int) -> None:
    # chmod, not the umask-filtered open() mode: the executable bit must survive any umask.
    os.chmod(temp, mode)
    os.replace(temp, path)
