"""Checking what the server sends against the digests asked for.

Hashing and zstd decoding are CPU work: callers on an event loop that the worker's
heartbeat and running actions share hand large amounts of it to a thread in one hop
(`BlobCheck.take` per ByteStream message, `expbuild.client.batches.unpack_read` per batch).
"""

from __future__ import annotations

from google.rpc import code_pb2

from expbuild.digest import Digest, digest_of, new_hasher
from expbuild.errors import InvalidArgument, RemoteError
from expbuild.reapi.compression import ZstdDecoder, decompress

INLINE_CHECK_BYTES = 64 * 1024
"""Less data than this is checked on the event loop: hashing it costs less than the thread
hop would."""


def corrupt(digest: Digest, size: int, actual_hash: str) -> RemoteError:
    return RemoteError(
        code_pb2.DATA_LOSS,
        f"blob {digest} sent by the server is corrupt: got {size} bytes hashing to {actual_hash}",
    )


def bad_compressed_data(error: InvalidArgument) -> RemoteError:
    """What a client makes of compressed data from the server that does not decode."""
    return RemoteError(code_pb2.DATA_LOSS, f"the server sent bad data: {error}")


def verify(digest: Digest, data: bytes) -> None:
    """Raise DATA_LOSS unless `data` is the blob `digest` names. Blocking."""
    actual = digest_of(data)
    if actual != digest:
        raise corrupt(digest, actual.size_bytes, actual.hash)


def decode_and_verify(digest: Digest, data: bytes, compressed: bool) -> bytes:
    """The blob from one batch entry, decoded if `compressed`, verified. Blocking."""
    if compressed:
        try:
            data = decompress(digest, data)
        except InvalidArgument as exc:
            raise bad_compressed_data(exc) from None
    verify(digest, data)
    return data


class BlobCheck:
    """Follows one blob arriving in pieces (a ByteStream read, maybe resumed): decodes
    zstd if it is compressed, refuses more bytes than the blob has, and hashes.

    `take` is blocking; `finish` raises DATA_LOSS unless everything hashed to the digest.
    """

    def __init__(self, digest: Digest, compressed: bool) -> None:
        self.digest = digest
        self.received = 0  # uncompressed bytes so far: where a resumed read starts
        self._compressed = compressed
        self._hasher = new_hasher()
        self._decoder: ZstdDecoder | None = None
        self.restart()

    def restart(self) -> None:
        """A new stream continues the blob at `received` (a resumed compressed read is a
        new zstd stream of the rest of the blob)."""
        self._decoder = ZstdDecoder(self.digest, self.received) if self._compressed else None

    def take(self, data: bytes) -> list[bytes]:
        """The blob's bytes that `data`, the next bytes received, carries."""
        if self._decoder is None:
            pieces = [data]
        else:
            try:
                pieces = self._decoder.decode(data)
            except InvalidArgument as exc:
                raise bad_compressed_data(exc) from None
        for piece in pieces:
            self.received += len(piece)
            if self.received > self.digest.size_bytes:
                raise RemoteError(
                    code_pb2.DATA_LOSS,
                    f"reading blob {self.digest}: the server sent more than "
                    f"{self.digest.size_bytes} bytes",
                )
            self._hasher.update(piece)
        return pieces

    def finish(self) -> None:
        actual = self._hasher.hexdigest()
        if self.received != self.digest.size_bytes or actual != self.digest.hash:
            raise corrupt(self.digest, self.received, actual)


__all__ = [
    "INLINE_CHECK_BYTES",
    "BlobCheck",
    "bad_compressed_data",
    "corrupt",
    "decode_and_verify",
    "verify",
]
