"""Continuing a ByteStream upload where the server got to.

A Write broken by a resumable code is continued after QueryWriteStatus says how much is
committed, a bounded number of times without progress; `CasClient.resume_upload` finishes
an upload an earlier process left unfinished the same way.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from google.rpc import code_pb2

from expbuild.client import streams
from expbuild.client.errors import from_rpc_error
from expbuild.digest import Digest
from expbuild.errors import RemoteError
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc

WRITE_RESUME_ATTEMPTS = 3
"""Broken streams continued without the server's committed size moving forward."""
RESUMABLE_WRITE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)


async def upload(
    stub: bytestream_pb2_grpc.ByteStreamStub,
    target: str | None,
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
                status = await stub.QueryWriteStatus(
                    bytestream_pb2.QueryWriteStatusRequest(resource_name=resource)
                )
                if status.complete or status.committed_size == -1:
                    return digest.size_bytes if started_at is None else started_at
                offset = status.committed_size
                if not 0 <= offset <= digest.size_bytes:
                    raise RemoteError(
                        code_pb2.INTERNAL,
                        f"uploading {what}: QueryWriteStatus reports {offset} bytes "
                        f"committed of {digest.size_bytes}",
                    )
                if offset > reached:  # progress: the attempts count afresh
                    reached, failures = offset, 0
            if started_at is None:
                started_at = offset
            await streams.write(stub, resource, digest, compressed, source, offset, what)
            return started_at
        except grpc.aio.AioRpcError as e:
            if e.code() not in RESUMABLE_WRITE_CODES or failures >= WRITE_RESUME_ATTEMPTS:
                raise from_rpc_error(e, target, f"uploading {what}") from None
            failures += 1
            resume = True
            await asyncio.sleep(streams.backoff(failures))


__all__ = ["RESUMABLE_WRITE_CODES", "WRITE_RESUME_ATTEMPTS", "upload"]
