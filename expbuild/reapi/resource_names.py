"""ByteStream resource names of CAS blobs, as REAPI spells them; parsed by the server,
built by the client.

Read:   {instance_name}/blobs/{hash}/{size}
        {instance_name}/compressed-blobs/zstd/{hash}/{size}
Write:  {instance_name}/uploads/{uuid}/blobs/{hash}/{size}[/{anything}]
        {instance_name}/uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}[/{anything}]

`instance_name` may be empty (then the name starts with the keyword) or contain
slashes; it ends at the first `blobs`, `compressed-blobs` or `uploads` segment, which
REAPI forbids inside instance names. A `sha256/` segment before the hash (the
digest-function form of REAPI 2.3) is accepted.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from expbuild.digest import Digest
from expbuild.errors import InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.compression import check_compressor

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


# ------------------------------------------------------------------------- building


def _blob_part(digest: Digest, compressor: str | None) -> str:
    kind = f"compressed-blobs/{compressor}" if compressor else "blobs"
    return f"{kind}/{digest.hash}/{digest.size_bytes}"


def _prefix(instance_name: str) -> str:
    return f"{instance_name}/" if instance_name else ""


def read_name(instance_name: str, digest: Digest, compressor: str | None = None) -> str:
    """The ByteStream Read name of a blob, compressed with `compressor` if given."""
    return _prefix(instance_name) + _blob_part(digest, check_compressor(compressor))


def upload_name(
    instance_name: str, digest: Digest, compressor: str | None = None, upload_id: str = ""
) -> str:
    """A ByteStream Write name for a blob; a fresh uuid unless `upload_id` is given."""
    upload_id = upload_id or str(uuid.uuid4())
    return f"{_prefix(instance_name)}uploads/{upload_id}/" + _blob_part(
        digest, check_compressor(compressor)
    )


# -------------------------------------------------------------------------- parsing


def _parse_blob_part(
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
                "ExpBuild uses sha256"
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


def parse_read_name(name: str) -> BlobResource:
    """Parse a ByteStream Read resource name; `InvalidArgument` saying the forms expected."""
    instance_name, segments = _split(name, READ_FORMS)
    if segments[0] == "uploads":
        raise InvalidArgument(
            f"resource name {name!r} is an upload name; reads expect {READ_FORMS}"
        )
    digest, compressor = _parse_blob_part(name, segments, write=False, forms=READ_FORMS)
    return BlobResource(instance_name, digest, compressor)


def parse_upload_name(name: str) -> BlobResource:
    """Parse a ByteStream Write/QueryWriteStatus resource name; `InvalidArgument`
    saying the forms expected."""
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
    digest, compressor = _parse_blob_part(name, segments[2:], write=True, forms=WRITE_FORMS)
    return BlobResource(instance_name, digest, compressor, upload_id)


__all__ = [
    "READ_FORMS",
    "WRITE_FORMS",
    "BlobResource",
    "parse_read_name",
    "parse_upload_name",
    "read_name",
    "upload_name",
]
