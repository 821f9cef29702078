"""ByteStream Read/Write/QueryWriteStatus for CAS blobs, with the REAPI resource names.

Read:   {instance_name}/blobs/{hash}/{size}
        {instance_name}/compressed-blobs/zstd/{hash}/{size}
Write:  {instance_name}/uploads/{uuid}/blobs/{hash}/{size}[/{anything}]
        {instance_name}/uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}[/{anything}]

`instance_name` may be empty (then the name starts with the keyword) or contain
slashes; it ends at the first `blobs`, `compressed-blobs` or `uploads` segment, which
REAPI forbids inside instance names. A `sha256/` segment before the hash (the
digest-function form of REAPI 2.3) is accepted.

Writes are resumable: the store keeps an upload's data by its uuid, so after a broken
stream QueryWriteStatus says how much was committed and a new Write continues from
there. Offsets follow REAPI: a compressed stream starts at an uncompressed offset (0,
or the committed size when resuming, with the rest of the blob compressed afresh) and
its later messages add the compressed bytes sent (see `expbuild.cas.store.UploadSession`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from expbuild.cas.store import FileStore, check_compressor
from expbuild.digest import Digest
from expbuild.errors import InvalidArgument, OutOfRange
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.server.instances import InstanceNames
from expbuild.server.metrics import CAS_BLOBS_READ, CAS_BYTES_READ
from expbuild.server.status import rpc

READ_CHUNK_SIZE = 1024 * 1024
"""Most data bytes in one ReadResponse."""

READ_FORMS = (
    "'{instance_name}/blobs/{hash}/{size}' or '{instance_name}/compressed-blobs/zstd/{hash}/{size}'"
)
WRITE_FORMS = (
    "'{instance_name}/uploads/{uuid}/blobs/{hash}/{size}[/...]' or "
    "'{instance_name}/uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}[/...]'"
)
_KEYWORDS = frozenset({"blobs", "compressed-blobs", "uploads"})
_DIGEST_FUNCTIONS = frozenset(
    name.lower() for name, _ in re_pb2.DigestFunction.Value.items() if name != "UNKNOWN"
)
_SIZE = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class BlobResource:
    instance_name: str
    digest: Digest
    compressor: str | None  # None: uncompressed; else as spelled in the name ("zstd")
    upload_id: str = ""  # write names only


def _blob_part(
    name: str, segments: list[str], *, write: bool, forms: str
) -> tuple[Digest, str | None]:
    """Parse `blobs/{hash}/{size}...` or `compressed-blobs/{compressor}/{hash}/{size}...`."""
    keyword, rest = segments[0], segments[1:]
    compressor = None
    if keyword == "compressed-blobs":
        if not rest or not rest[0]:
            raise InvalidArgument(f"resource name {name!r} names no compressor; expected {forms}")
        compressor, rest = rest[0], rest[1:]
        if compressor == "identity":
            raise InvalidArgument(
                f"resource name {name!r}: use blobs/ rather than compressed-blobs/identity/"
            )
        try:
            check_compressor(compressor)
        except InvalidArgument as exc:
            raise InvalidArgument(f"resource name {name!r}: {exc}") from None
    if rest and rest[0] in _DIGEST_FUNCTIONS:
        if rest[0] != "sha256":
            raise InvalidArgument(
                f"resource name {name!r}: digest function {rest[0]!r} is not supported; "
                "this server uses sha256"
            )
        rest = rest[1:]
    if len(rest) < 2 or (not write and len(rest) > 2):
        raise InvalidArgument(f"resource name {name!r} is not of the form {forms}")
    hash_, size = rest[0], rest[1]
    if not _SIZE.fullmatch(size):
        raise InvalidArgument(
            f"resource name {name!r}: size {size!r} is not a non-negative integer; expected {forms}"
        )
    try:
        digest = Digest(hash_, int(size))
    except InvalidArgument as exc:
        raise InvalidArgument(f"resource name {name!r}: {exc}") from None
    return digest, compressor


def _split(name: str, forms: str) -> tuple[str, list[str]]:
    """Split off the instance name at the first keyword segment."""
    segments = name.split("/")
    for i, segment in enumerate(segments):
        if segment in _KEYWORDS:
            return "/".join(segments[:i]), segments[i:]
    raise InvalidArgument(f"resource name {name!r} is not of the form {forms}")


def parse_read_resource(name: str) -> BlobResource:
    """Parse a ByteStream Read resource name; `InvalidArgument` saying the forms expected."""
    instance_name, segments = _split(name, READ_FORMS)
    if segments[0] == "uploads":
        raise InvalidArgument(
            f"resource name {name!r} is an upload name; reads expect {READ_FORMS}"
        )
    digest, compressor = _blob_part(name, segments, write=False, forms=READ_FORMS)
    return BlobResource(instance_name, digest, compressor)


def parse_write_resource(name: str) -> BlobResource:
    """Parse a ByteStream Write/QueryWriteStatus resource name."""
    instance_name, segments = _split(name, WRITE_FORMS)
    if (
        segments[0] != "uploads"
        or len(segments) < 3
        or segments[2] not in ("blobs", "compressed-blobs")
    ):
        raise InvalidArgument(f"resource name {name!r} is not of the form {WRITE_FORMS}")
    upload_id = segments[1]
    if not upload_id:
        raise InvalidArgument(f"resource name {name!r} has an empty uuid; expected {WRITE_FORMS}")
    digest, compressor = _blob_part(name, segments[2:], write=True, forms=WRITE_FORMS)
    return BlobResource(instance_name, digest, compressor, upload_id)


class ByteStreamServicer(bytestream_pb2_grpc.ByteStreamServicer):
    def __init__(self, store: FileStore, instances: InstanceNames) -> None:
        self._store = store
        self._instances = instances

    @rpc
    async def Read(self, request, context):
        resource = parse_read_resource(request.resource_name)
        self._instances.check(resource.instance_name)
        if request.read_offset < 0:
            raise OutOfRange(f"read_offset {request.read_offset} is negative")
        if request.read_limit < 0:
            raise OutOfRange(f"read_limit {request.read_limit} is negative")
        if resource.compressor is not None:
            if request.read_limit:
                raise InvalidArgument(
                    f"read_limit must be 0 when reading compressed blobs (got {request.read_limit})"
                )
            chunks = self._store.read_compressed(
                resource.digest, request.read_offset, resource.compressor, READ_CHUNK_SIZE
            )
        else:
            chunks = self._store.read_chunks(
                resource.digest, request.read_offset, request.read_limit, READ_CHUNK_SIZE
            )
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                CAS_BYTES_READ.labels("ByteStream.Read").inc(len(chunk))
                yield bytestream_pb2.ReadResponse(data=chunk)
        CAS_BLOBS_READ.labels("ByteStream.Read").inc()

    @rpc
    async def Write(self, request_iterator, context):
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            raise InvalidArgument("Write stream carried no WriteRequest")
        name = first.resource_name
        if not name:
            raise InvalidArgument(f"the first WriteRequest must set resource_name to {WRITE_FORMS}")
        resource = parse_write_resource(name)
        self._instances.check(resource.instance_name)
        upload = await self._store.open_upload(
            resource.upload_id, resource.digest, resource.compressor
        )
        request = first
        while True:
            if upload.complete:
                return bytestream_pb2.WriteResponse(committed_size=upload.result_size)
            if request.resource_name and request.resource_name != name:
                raise InvalidArgument(
                    f"resource_name changed within a Write stream, from {name!r} "
                    f"to {request.resource_name!r}"
                )
            done = await upload.write(
                request.write_offset,
                request.data,
                first=request is first,
                finish=request.finish_write,
            )
            if done:
                return bytestream_pb2.WriteResponse(committed_size=upload.result_size)
            request = await anext(requests, None)
            if request is None:
                offset = await upload.resume_offset()
                raise InvalidArgument(
                    f"Write stream for {name!r} ended without finish_write; "
                    f"{offset} bytes are committed, continue with write_offset {offset}"
                )

    @rpc
    async def QueryWriteStatus(self, request, context):
        resource = parse_write_resource(request.resource_name)
        self._instances.check(resource.instance_name)
        committed, complete = await self._store.upload_status(
            resource.upload_id, resource.digest, resource.compressor
        )
        return bytestream_pb2.QueryWriteStatusResponse(committed_size=committed, complete=complete)
