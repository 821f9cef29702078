"""Content digests: the (hash, size) pair that names every blob in the CAS.

Only SHA-256 is supported today. Parsing is strict: a digest that does not
name a possible SHA-256 blob raises `InvalidArgument` with a message that
says what is wrong, so every entry point (gRPC, CLI, config) reports the
same thing for the same mistake.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from expbuild.errors import InvalidArgument

HASH_NAME = "sha256"
HASH_LENGTH = 64
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Digest:
    hash: str
    size_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.hash, str) or not _HEX.fullmatch(self.hash):
            if isinstance(self.hash, str) and len(self.hash) != HASH_LENGTH:
                raise InvalidArgument(
                    f"digest hash {self.hash!r} has {len(self.hash)} characters; "
                    f"a SHA-256 hash has {HASH_LENGTH} lowercase hex characters"
                )
            raise InvalidArgument(
                f"digest hash {self.hash!r} is not {HASH_LENGTH} lowercase hex characters"
            )
        if not isinstance(self.size_bytes, int) or self.size_bytes < 0:
            raise InvalidArgument(f"digest size {self.size_bytes!r} must be a non-negative integer")

    def __str__(self) -> str:
        return f"{self.hash}/{self.size_bytes}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse the `hash/size` form used on the command line and in resource names."""
        hash_, sep, size = text.strip().partition("/")
        if not sep:
            raise InvalidArgument(f"digest {text!r} is not of the form <sha256-hex>/<size>")
        try:
            size_bytes = int(size, 10)
        except ValueError:
            raise InvalidArgument(f"digest {text!r}: size {size!r} is not an integer") from None
        return cls(hash_, size_bytes)

    @classmethod
    def from_proto(cls, message) -> Digest:
        """Validate a REAPI `Digest` message."""
        return cls(message.hash, message.size_bytes)

    def to_proto(self):
        from expbuild.proto import remote_execution_pb2

        return remote_execution_pb2.Digest(hash=self.hash, size_bytes=self.size_bytes)

    @property
    def is_empty(self) -> bool:
        return self.size_bytes == 0


def check_digest_function(value: int) -> None:
    """Only SHA-256 is served; UNKNOWN (unset) means SHA-256 too."""
    from expbuild.proto import remote_execution_pb2

    if value not in (
        remote_execution_pb2.DigestFunction.UNKNOWN,
        remote_execution_pb2.DigestFunction.SHA256,
    ):
        try:
            name = remote_execution_pb2.DigestFunction.Value.Name(value)
        except ValueError:
            name = f"#{value}"
        raise InvalidArgument(f"digest_function {name} is not supported; this server uses SHA256")


def digest_field(message, field: str) -> Digest:
    """Validate a REAPI `Digest` message that is field `field` of a request, naming the
    field in the error."""
    try:
        return Digest.from_proto(message)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{field}: {exc}") from None


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def new_hasher():
    return hashlib.sha256()


_FILE_CHUNK = 1024 * 1024


def digest_of_file(path) -> Digest:
    """The digest of a file's content, read in chunks (blocking: call it in a thread)."""
    hasher = new_hasher()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_FILE_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return Digest(hasher.hexdigest(), size)


EMPTY = digest_of(b"")
