"""Moving blobs to and from a remote Content Addressable Storage.

Small blobs travel in BatchUpdateBlobs / BatchReadBlobs requests (`batches`), large ones
through ByteStream Write / Read in 1 MiB chunks (`streams`), so memory use stays bounded
by the batch size and the number of concurrent transfers. Everything read is checked
against its digest (`integrity`), off the event loop for all but small amounts of data.

With zstd on (`CasClient.connect` turns it on when the server offers it), blobs of at
least `ZSTD_MIN_BYTES` travel compressed: through `compressed-blobs/zstd/...` ByteStream
resources and as ZSTD entries of batches; the CAS itself always holds (and digests name)
the uncompressed bytes. A ByteStream upload whose stream breaks is continued from where
QueryWriteStatus says the server got to (`resume`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import uuid
from collections.abc import AsyncGenerator, Awaitable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
from google.rpc import code_pb2

from expbuild.aio import gather_or_cancel
from expbuild.client import batches, resume, streams
from expbuild.client.batches import (
    ENTRY_OVERHEAD,
    IDENTITY,
    REQUEST_OVERHEAD,
    ZSTD,
    ZSTD_MIN_BYTES,
)
from expbuild.client.capabilities import fetch_capabilities
from expbuild.client.channel import MAX_MESSAGE_BYTES, channel_target
from expbuild.client.errors import from_rpc_error
from expbuild.client.files import publish, temp_path_for, write_new_file
from expbuild.client.integrity import INLINE_CHECK_BYTES
from expbuild.digest import Digest
from expbuild.errors import NotFound, RemoteError
from expbuild.proto import bytestream_pb2_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.reapi import resource_names
from expbuild.reapi.compression import ZSTD as ZSTD_NAME

MiB = 1024 * 1024
DEFAULT_MAX_BATCH_BYTES = 4 * MiB
FIND_MISSING_BATCH = 10_000
DEFAULT_CONCURRENCY = 8
DEFAULT_TREE_PAGE_SIZE = 0  # let the server choose


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
        self._batch_budget = max_batch_bytes - REQUEST_OVERHEAD - len(instance_name.encode())
        if self._batch_budget <= ENTRY_OVERHEAD:
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
        tiny = limit - REQUEST_OVERHEAD - len(instance_name.encode()) <= ENTRY_OVERHEAD
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
        return digest.size_bytes + ENTRY_OVERHEAD <= self._batch_budget

    def _compresses(self, digest: Digest) -> bool:
        return self._compressor == ZSTD and digest.size_bytes >= ZSTD_MIN_BYTES

    def _batches(self, digests: Iterable[Digest]) -> list[list[Digest]]:
        return batches.plan(digests, self._batch_budget)

    def upload_resource_name(self, digest: Digest, *, compressed: bool | None = None) -> str:
        """A fresh ByteStream Write resource name for `digest` (a new uuid each call).

        `compressed` defaults to what this client does with the blob (zstd if it is on
        and the blob is not tiny).
        """
        if compressed is None:
            compressed = self._compresses(digest)
        return resource_names.upload_name(
            self.instance_name, digest, ZSTD_NAME if compressed else None
        )

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
        return await self.upload_missing(blobs, await self.find_missing(blobs.keys()))

    async def upload_missing(
        self, blobs: Mapping[Digest, bytes | Path], missing: Sequence[Digest]
    ) -> int:
        """`upload` for a caller that already asked FindMissingBlobs: sends `missing`
        (digests of `blobs`) without asking again."""
        small = [d for d in missing if self.fits_in_batch(d)]
        large = [d for d in missing if not self.fits_in_batch(d)]
        jobs: list[Awaitable[None]] = [
            self._upload_batch([(d, blobs[d]) for d in batch]) for batch in self._batches(small)
        ]
        jobs += [self._write(d, blobs[d]) for d in large]
        await gather_or_cancel(jobs)
        return sum(d.size_bytes for d in missing)

    async def _upload_batch(self, items: list[tuple[Digest, bytes | Path]]) -> None:
        compress = self._batch_update_compressor == ZSTD
        # The slot is taken before reading the files so that at most `concurrency`
        # batches are held in memory at once.
        async with self._rpc_slots:
            # One thread hop reads (and compresses) every file of the batch.
            entries = await asyncio.to_thread(batches.pack_update, items, compress)
            request = re_pb2.BatchUpdateBlobsRequest(
                instance_name=self.instance_name,
                requests=entries,
                digest_function=re_pb2.DigestFunction.SHA256,
            )
            del entries
            with self._translated_errors():
                response = await self._cas.BatchUpdateBlobs(request)
        batches.check_update(response, items)

    async def _write(self, digest: Digest, source: bytes | Path) -> None:
        resource = self.upload_resource_name(digest)
        async with self._rpc_slots:
            await resume.upload(
                self._bytestream,
                self._target,
                resource,
                digest,
                self._compresses(digest),
                source,
                resume=False,
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
        parsed = resource_names.parse_upload_name(resource_name)
        async with self._rpc_slots:
            return await resume.upload(
                self._bytestream,
                self._target,
                resource_name,
                parsed.digest,
                parsed.compressor is not None,
                source,
                resume=True,
            )

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
        unpack = functools.partial(
            batches.unpack_read, response, digests, missing_ok=missing_ok, compressed=compressed
        )
        if response.ByteSize() < INLINE_CHECK_BYTES:
            return unpack()
        # One thread hop decodes and hashes the whole batch.
        return await asyncio.to_thread(unpack)

    async def _verified_stream(self, digest: Digest) -> AsyncGenerator[bytes, None]:
        """The blob's verified chunks via ByteStream Read (see `streams.read`)."""
        compressed = self._compresses(digest)
        resource = resource_names.read_name(
            self.instance_name, digest, ZSTD_NAME if compressed else None
        )
        async with self._rpc_slots:
            chunks = streams.read(self._bytestream, self._target, resource, digest, compressed)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield chunk

    async def read_to_file(self, digest: Digest, path: Path, executable: bool = False) -> None:
        """Write the blob to `path` (mode 0o755 if `executable`, else 0o644).

        Large blobs are streamed to disk, never held in memory. The file appears only once
        complete and verified (written under a temporary name in the same directory, then
        renamed over any existing file); parent directories are created as needed. On
        failure nothing is left behind.
        """
        mode = 0o755 if executable else 0o644
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_path_for(path, uuid.uuid4().hex)
        try:
            if digest.is_empty or self.fits_in_batch(digest):
                data = await self.read(digest)
                await asyncio.to_thread(write_new_file, temp, data)
            else:
                await self._stream_to_file(digest, temp)
            await asyncio.to_thread(publish, temp, path, mode)
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
    ) -> AsyncGenerator[list[re_pb2.Directory], None]:
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
                            code_pb2.INTERNAL,
                            f"reading the tree of {root_digest}: GetTree returned nothing "
                            "past its page token",
                        )
                except grpc.aio.AioRpcError as e:
                    resumable = e.code() == grpc.StatusCode.UNAVAILABLE and bool(token)
                    if not resumable or failures >= streams.READ_RESUME_ATTEMPTS:
                        raise from_rpc_error(
                            e, self._target, f"reading the tree of {root_digest}"
                        ) from None
                    failures += 1
                    await asyncio.sleep(streams.backoff(failures))
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
