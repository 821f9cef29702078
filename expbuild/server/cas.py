"""ContentAddressableStorage: FindMissingBlobs, the batch calls and GetTree over a `FileStore`.

A thin adapter: it validates and translates messages; storing, reading, verifying and
(de)compressing blobs is `expbuild.cas.store`'s job; splitting and splicing
`expbuild.cas.chunking`'s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import AsyncIterator, Iterator

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from expbuild.cas.chunking import splice_blob, split_blob
from expbuild.cas.store import FileStore
from expbuild.digest import Digest, check_digest_function, digest_field
from expbuild.errors import InvalidArgument, NotFound, ResourceExhausted
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.reapi.compression import ZSTD
from expbuild.reapi.status import ok_status, to_status
from expbuild.server.instances import InstanceNames
from expbuild.server.metrics import CAS_BLOBS_READ, CAS_BYTES_READ
from expbuild.server.status import client_status, rpc
from expbuild.text import quoted

log = logging.getLogger(__name__)

MAX_TREE_PAGE_SIZE = 10_000
"""Most directories in one GetTreeResponse, whatever page_size the client asks for."""
MAX_TREE_PAGE_BYTES = 2 * 1024 * 1024
"""A GetTreeResponse is cut before it grows past this (unless one directory alone is larger)."""
_TREE_READ_BATCH = 1000
_PAGE_TOKEN_VERSION = "t1"

_COMPRESSOR_NAMES: dict[int, str | None] = {
    re_pb2.Compressor.IDENTITY: None,
    re_pb2.Compressor.ZSTD: ZSTD,
}


def compressor_name(value: int) -> str | None:
    """Compressor enum -> the store's spelling; an unsupported one keeps its name for the error."""
    if value in _COMPRESSOR_NAMES:
        return _COMPRESSOR_NAMES[value]
    try:
        return re_pb2.Compressor.Value.Name(value).lower()
    except ValueError:
        return f"compressor #{value}"


def _blob_status(error: Exception | None, where: str) -> status_pb2.Status:
    """The per-blob google.rpc.Status of a batch entry, worded as a call's would be
    (`where` names the call and blob in the log line of an internal error)."""
    return ok_status() if error is None else client_status(error, where)


def _page_token(root: Digest, offset: int) -> str:
    text = f"{_PAGE_TOKEN_VERSION}:{root}:{offset}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _page_offset(token: str, root: Digest) -> int:
    """Where a page token says to continue; 0 for no token."""
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, tree, offset = text.split(":")
        if version == _PAGE_TOKEN_VERSION and tree == str(root) and offset.isdigit():
            return int(offset)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise InvalidArgument(
        f"page_token {quoted(token)} is not a next_page_token this server returned for root_digest {root}"
    )


class ContentAddressableStorageServicer(re_grpc.ContentAddressableStorageServicer):
    def __init__(
        self,
        store: FileStore,
        instances: InstanceNames,
        max_batch_total_size_bytes: int,
        max_directory_size_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._store = store
        self._instances = instances
        self._max_batch = max_batch_total_size_bytes
        self._max_directory = max_directory_size_bytes

    def _check_batch_size(self, total: int, count: int, verb: str, alternative: str) -> None:
        if total > self._max_batch:
            raise InvalidArgument(
                f"batch to {verb} {count} blobs totals {total} bytes, more than the server's "
                f"max_batch_total_size_bytes of {self._max_batch}; split the batch or use "
                f"ByteStream {alternative} for large blobs"
            )

    @rpc
    async def FindMissingBlobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: grpc.aio.ServicerContext
    ):
        self._instances.check(request.instance_name)
        check_digest_function(request.digest_function)
        digests = [
            digest_field(d, f"blob_digests[{i}]") for i, d in enumerate(request.blob_digests)
        ]
        missing = await self._store.find_missing(digests, touch=True)
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=[d.to_proto() for d in missing])

    @rpc
    async def BatchUpdateBlobs(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: grpc.aio.ServicerContext
    ):
        self._instances.check(request.instance_name)
        check_digest_function(request.digest_function)
        total = sum(max(len(r.data), r.digest.size_bytes, 0) for r in request.requests)
        self._check_batch_size(total, len(request.requests), "upload", "Write")

        statuses: list = [None] * len(request.requests)
        items: list[tuple[Digest, bytes] | tuple[Digest, bytes, str | None]] = []
        slots: list[int] = []
        for i, r in enumerate(request.requests):
            try:
                digest = digest_field(r.digest, f"requests[{i}].digest")
            except InvalidArgument as exc:
                statuses[i] = to_status(exc)
                continue
            items.append((digest, r.data, compressor_name(r.compressor)))
            slots.append(i)
        for slot, item, error in zip(slots, items, await self._store.put_many(items), strict=True):
            statuses[slot] = _blob_status(error, f"BatchUpdateBlobs (blob {item[0]})")
        return re_pb2.BatchUpdateBlobsResponse(
            responses=[
                re_pb2.BatchUpdateBlobsResponse.Response(digest=r.digest, status=status)
                for r, status in zip(request.requests, statuses, strict=True)
            ]
        )

    @rpc
    async def BatchReadBlobs(
        self, request: re_pb2.BatchReadBlobsRequest, context: grpc.aio.ServicerContext
    ):
        self._instances.check(request.instance_name)
        check_digest_function(request.digest_function)
        total = sum(max(d.size_bytes, 0) for d in request.digests)
        self._check_batch_size(total, len(request.digests), "read", "Read")
        compressor = ZSTD if re_pb2.Compressor.ZSTD in request.acceptable_compressors else None
        wire_compressor = re_pb2.Compressor.ZSTD if compressor else re_pb2.Compressor.IDENTITY

        responses = [re_pb2.BatchReadBlobsResponse.Response(digest=d) for d in request.digests]
        digests: list[Digest] = []
        slots: list[int] = []
        for i, d in enumerate(request.digests):
            try:
                digests.append(digest_field(d, f"digests[{i}]"))
            except InvalidArgument as exc:
                responses[i].status.CopyFrom(to_status(exc))
                continue
            slots.append(i)
        results = await self._store.get_many(digests, compressor=compressor)
        for slot, digest, result in zip(slots, digests, results, strict=True):
            response = responses[slot]
            if isinstance(result, Exception):
                response.status.CopyFrom(_blob_status(result, f"BatchReadBlobs (blob {digest})"))
            else:
                response.data = result
                response.compressor = wire_compressor
                response.status.CopyFrom(ok_status())
                CAS_BLOBS_READ.labels("BatchReadBlobs").inc()
                CAS_BYTES_READ.labels("BatchReadBlobs").inc(len(result))
        return re_pb2.BatchReadBlobsResponse(responses=responses)

    @rpc
    async def SplitBlob(self, request, context):
        self._instances.check(request.instance_name)
        check_digest_function(request.digest_function)
        digest = digest_field(request.blob_digest, "blob_digest")
        chunks = await asyncio.to_thread(split_blob, self._store, digest)
        # The chunking is this server's own choice (see expbuild.cas.chunking).
        return re_pb2.SplitBlobResponse(
            chunk_digests=[c.to_proto() for c in chunks],
            chunking_function=re_pb2.ChunkingFunction.UNKNOWN,
        )

    @rpc
    async def SpliceBlob(self, request, context):
        self._instances.check(request.instance_name)
        check_digest_function(request.digest_function)
        if not request.HasField("blob_digest"):
            raise InvalidArgument("blob_digest is not set; SpliceBlob needs the expected digest")
        digest = digest_field(request.blob_digest, "blob_digest")
        chunks = [
            digest_field(d, f"chunk_digests[{i}]") for i, d in enumerate(request.chunk_digests)
        ]
        # Whatever chunking_function the client used, the check is the same: the chunks
        # must concatenate to blob_digest.
        # A full disk becomes RESOURCE_EXHAUSTED in `rpc`, as for every call.
        spliced = await asyncio.to_thread(splice_blob, self._store, digest, chunks)
        return re_pb2.SpliceBlobResponse(blob_digest=spliced.to_proto())

    @rpc
    async def GetTree(self, request: re_pb2.GetTreeRequest, context: grpc.aio.ServicerContext):
        self._instances.check(request.instance_name)
        check_digest_function(request.digest_function)
        root = digest_field(request.root_digest, "root_digest")
        if request.page_size < 0:
            raise InvalidArgument(f"page_size {request.page_size} is negative")
        page_size = min(request.page_size or MAX_TREE_PAGE_SIZE, MAX_TREE_PAGE_SIZE)
        start = _page_offset(request.page_token, root)

        page: list[re_pb2.Directory] = []
        page_bytes = 0
        async for position, directory, size in self._walk(root):
            if position < start:
                continue
            if page and (len(page) >= page_size or page_bytes + size > MAX_TREE_PAGE_BYTES):
                yield re_pb2.GetTreeResponse(
                    directories=page, next_page_token=_page_token(root, position)
                )
                page, page_bytes = [], 0
            page.append(directory)
            page_bytes += size
            CAS_BLOBS_READ.labels("GetTree").inc()
            CAS_BYTES_READ.labels("GetTree").inc(size)
        yield re_pb2.GetTreeResponse(directories=page)

    async def _walk(self, root: Digest) -> AsyncIterator[tuple[int, re_pb2.Directory, int]]:
        """Breadth-first, each directory once: (position, Directory, encoded size).

        The order is stable for unchanged CAS content, which page tokens rely on.
        Directories missing from the CAS (other than the root) are left out with
        everything below them, as REAPI asks. Blobs are read in batches of about one
        page's bytes, and none larger than `max_directory_size_bytes`, so a walk holds
        about one page of directories in memory.
        """
        level = [root]
        seen = {root}
        position = 0
        while level:
            following: list[Digest] = []
            for batch in self._read_batches(level):
                for digest, blob in zip(batch, await self._store.get_many(batch), strict=True):
                    is_root = position == 0 and digest == root
                    if isinstance(blob, NotFound):
                        if is_root:
                            raise NotFound(f"root directory {root} is not in the CAS")
                        continue
                    if isinstance(blob, Exception):
                        raise blob
                    directory = re_pb2.Directory()
                    try:
                        directory.ParseFromString(blob)
                    except (DecodeError, RecursionError):
                        if is_root:
                            raise InvalidArgument(
                                f"root_digest {root} names a blob that is not a Directory message"
                            ) from None
                        log.warning("GetTree %s: blob %s is not a Directory; skipped", root, digest)
                        continue
                    for node in directory.directories:
                        try:
                            child = Digest.from_proto(node.digest)
                        except InvalidArgument as exc:
                            log.warning(
                                "GetTree %s: directory %s: %s; skipped",
                                root,
                                quoted(node.name),
                                exc,
                            )
                            continue
                        if child not in seen:
                            seen.add(child)
                            following.append(child)
                    yield position, directory, len(blob)
                    position += 1
            level = following

    def _read_batches(self, digests: list[Digest]) -> Iterator[list[Digest]]:
        """`digests` in batches of at most _TREE_READ_BATCH and about one page's bytes;
        RESOURCE_EXHAUSTED for a directory above the size bound, before it is read."""
        batch: list[Digest] = []
        batch_bytes = 0
        for digest in digests:
            if digest.size_bytes > self._max_directory:
                raise ResourceExhausted(
                    f"directory {digest} is {digest.size_bytes} bytes, more than this server's "
                    f"limit of {self._max_directory} ([server] max_directory_size_bytes)"
                )
            if batch and (
                len(batch) >= _TREE_READ_BATCH
                or batch_bytes + digest.size_bytes > MAX_TREE_PAGE_BYTES
            ):
                yield batch
                batch, batch_bytes = [], 0
            batch.append(digest)
            batch_bytes += digest.size_bytes
        if batch:
            yield batch
