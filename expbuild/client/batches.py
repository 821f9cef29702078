"""BatchUpdateBlobs and BatchReadBlobs: which blobs share a request, and the blocking
work on either side of one (reading and compressing local files, decoding and checking
what came back). `CasClient` sends the requests."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from google.rpc import code_pb2

from expbuild.client.files import read_local
from expbuild.client.integrity import decode_and_verify
from expbuild.digest import Digest
from expbuild.errors import RemoteError
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.compression import zstd_compressor
from expbuild.reapi.status import from_status

IDENTITY = re_pb2.Compressor.IDENTITY
ZSTD = re_pb2.Compressor.ZSTD
ZSTD_MIN_BYTES = 1024
"""Smaller blobs travel uncompressed even with zstd on: the frame overhead and the CPU
spent would buy next to nothing."""

# What a batch entry costs on the wire besides its data: the Digest message (64-char hash,
# varint size) plus tags and length prefixes, rounded up generously.
ENTRY_OVERHEAD = 160
# The request envelope: instance name, digest_function, the outer length prefixes.
REQUEST_OVERHEAD = 1024
_NOT_FOUND = code_pb2.NOT_FOUND


def plan(digests: Iterable[Digest], budget: int) -> list[list[Digest]]:
    """Group small digests so each group's data plus overhead stays within `budget`."""
    batches: list[list[Digest]] = []
    current: list[Digest] = []
    used = 0
    for digest in digests:
        cost = digest.size_bytes + ENTRY_OVERHEAD
        if current and used + cost > budget:
            batches.append(current)
            current, used = [], 0
        current.append(digest)
        used += cost
    if current:
        batches.append(current)
    return batches


def pack_update(
    items: list[tuple[Digest, bytes | Path]], compress: bool
) -> list[re_pb2.BatchUpdateBlobsRequest.Request]:
    """The entries of one BatchUpdateBlobs request, zstd-compressed where `compress` is on
    and it pays off. Blocking: reads the files."""
    cctx = zstd_compressor()
    entries = []
    for digest, source in items:
        data, compressor = read_local(digest, source), IDENTITY
        if compress and digest.size_bytes >= ZSTD_MIN_BYTES:
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


def check_update(
    response: re_pb2.BatchUpdateBlobsResponse, items: list[tuple[Digest, bytes | Path]]
) -> None:
    """Raise the error of the first blob the server refused, or left unanswered."""
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
            code_pb2.INTERNAL,
            f"uploading blob {unanswered[0]}: the server's BatchUpdateBlobs response "
            f"does not mention it ({len(unanswered)} blob(s) unanswered)",
        )


def _compressor_name(value: int) -> str:
    try:
        return re_pb2.Compressor.Value.Name(value)
    except ValueError:
        return f"compressor #{value}"


def unpack_read(
    response: re_pb2.BatchReadBlobsResponse,
    digests: list[Digest],
    *,
    missing_ok: bool,
    compressed: bool,
) -> dict[Digest, bytes]:
    """The verified blobs of one BatchReadBlobs response. With `missing_ok`, blobs the
    server reports NOT_FOUND are left out instead of raising `NotFound`; with
    `compressed`, zstd entries are decoded. Blocking: hashes (and decodes) every blob."""
    found: dict[Digest, bytes] = {}
    absent: set[Digest] = set()
    for entry in response.responses:
        digest = Digest.from_proto(entry.digest)
        if entry.status.code == _NOT_FOUND and missing_ok:
            absent.add(digest)
            continue
        if entry.status.code != 0:
            raise from_status(entry.status, f"reading blob {digest}")
        if entry.compressor not in (IDENTITY, ZSTD) or (
            entry.compressor == ZSTD and not compressed
        ):
            asked = "zstd" if compressed else "no compression"
            raise RemoteError(
                code_pb2.INTERNAL,
                f"reading blob {digest}: the server sent it compressed with "
                f"{_compressor_name(entry.compressor)} although {asked} was requested",
            )
        found[digest] = decode_and_verify(digest, entry.data, entry.compressor == ZSTD)
    for digest in digests:
        if digest not in found and digest not in absent:
            raise RemoteError(
                code_pb2.INTERNAL,
                f"reading blob {digest}: the server's BatchReadBlobs response does not mention it",
            )
    return found


__all__ = [
    "ENTRY_OVERHEAD",
    "IDENTITY",
    "REQUEST_OVERHEAD",
    "ZSTD",
    "ZSTD_MIN_BYTES",
    "check_update",
    "pack_update",
    "plan",
    "unpack_read",
]
