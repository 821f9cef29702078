"""ByteStream Read/Write/QueryWriteStatus for CAS blobs (resource names: see
`expbuild.reapi.resource_names`).

Writes are resumable: the store keeps an upload's data by its uuid, so after a broken
stream QueryWriteStatus says how much was committed and a new Write continues from
there. Offsets follow REAPI: a compressed stream starts at an uncompressed offset (0,
or the committed size when resuming, with the rest of the blob compressed afresh) and
its later messages add the compressed bytes sent (see `expbuild.cas.uploads.UploadSession`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from expbuild.cas.store import FileStore
from expbuild.errors import InvalidArgument, OutOfRange
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc
from expbuild.reapi.resource_names import WRITE_FORMS, parse_read_name, parse_upload_name
from expbuild.server.instances import InstanceNames
from expbuild.server.metrics import CAS_BLOBS_READ, CAS_BYTES_READ
from expbuild.server.status import rpc

READ_CHUNK_SIZE = 1024 * 1024
"""Most data bytes in one ReadResponse."""


class ByteStreamServicer(bytestream_pb2_grpc.ByteStreamServicer):
    def __init__(self, store: FileStore, instances: InstanceNames) -> None:
        self._store = store
        self._instances = instances

    @rpc
    async def Read(self, request: bytestream_pb2.ReadRequest, context: grpc.aio.ServicerContext):
        resource = parse_read_name(request.resource_name)
        self._instances.check(resource.instance_name)
        if request.read_offset < 0:
            raise OutOfRange(f"read_offset {request.read_offset} is negative")
        if request.read_limit < 0:  # not a position: no state of the blob makes it valid
            raise InvalidArgument(f"read_limit {request.read_limit} is negative")
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
    async def Write(
        self,
        request_iterator: AsyncIterator[bytestream_pb2.WriteRequest],
        context: grpc.aio.ServicerContext,
    ):
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            raise InvalidArgument("Write stream carried no WriteRequest")
        name = first.resource_name
        if not name:
            raise InvalidArgument(f"the first WriteRequest must set resource_name to {WRITE_FORMS}")
        resource = parse_upload_name(name)
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
            following = await anext(requests, None)
            if following is None:
                offset = await upload.resume_offset()
                raise InvalidArgument(
                    f"Write stream for {name!r} ended without finish_write; "
                    f"{offset} bytes are committed, continue with write_offset {offset}"
                )
            request = following

    @rpc
    async def QueryWriteStatus(
        self, request: bytestream_pb2.QueryWriteStatusRequest, context: grpc.aio.ServicerContext
    ):
        resource = parse_upload_name(request.resource_name)
        self._instances.check(resource.instance_name)
        committed, complete = await self._store.upload_status(
            resource.upload_id, resource.digest, resource.compressor
        )
        return bytestream_pb2.QueryWriteStatusResponse(committed_size=committed, complete=complete)
