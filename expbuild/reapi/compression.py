"""Blob compression as REAPI defines it: zstd, with digests naming the uncompressed bytes.

One streaming decoder serves the store (compressed uploads, BatchUpdateBlobs entries) and
the client (compressed reads). It never produces more than the blob can hold, so a
decompression bomb is stopped after at most one piece of output. Everything here is
blocking CPU work: callers on an event loop run it in a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import IO, cast

import zstandard

from expbuild.digest import Digest
from expbuild.errors import InvalidArgument

ZSTD = "zstd"
SUPPORTED_COMPRESSORS: tuple[str, ...] = (ZSTD,)
"""Compressors ExpBuild decodes and encodes, spelled as in REAPI resource names."""
ZSTD_LEVEL = 3
PIECE_BYTES = 256 * 1024
"""Most output the decoder hands over at once: what an oversize stream can cost beyond
the blob's size before it is refused."""


def check_compressor(compressor: str | None) -> str | None:
    """Normalise a compressor name: None, "" or "identity" mean uncompressed (None).

    Raises `InvalidArgument` naming the supported ones for anything else unknown.
    """
    if compressor is None or compressor in ("", "identity"):
        return None
    if compressor in SUPPORTED_COMPRESSORS:
        return compressor
    raise InvalidArgument(
        f"compressor {compressor!r} is not supported; ExpBuild supports "
        f"{', '.join(SUPPORTED_COMPRESSORS)} and uncompressed data"
    )


def zstd_compressor() -> zstandard.ZstdCompressor:
    """A zstd compressor at the level ExpBuild uses everywhere."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL)


class _Sink:
    """The file-like object zstandard's stream writer writes into; passes each piece on."""

    __slots__ = ("target",)

    def __init__(self) -> None:
        self.target: Callable[[bytes], object] | None = None

    def write(self, data) -> int:
        assert self.target is not None
        self.target(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ZstdDecoder:
    """Streaming zstd decoding of blob `digest` from uncompressed `offset` to its end.

    `feed(data, target)` decodes the next compressed bytes and calls `target(piece)` for
    each piece of output (at most `PIECE_BYTES`), so output can go to a file as it comes.
    Concatenated frames are accepted. Raises `InvalidArgument` naming the blob for data
    that is not zstd and as soon as the output would run past the blob's end.
    """

    def __init__(self, digest: Digest, offset: int = 0) -> None:
        self.digest = digest
        self.received = offset  # uncompressed bytes of the blob up to the end of the output
        self._sink = _Sink()
        # The sink only has write, flush and close: enough for the stream writer.
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            cast(IO[bytes], self._sink), write_size=PIECE_BYTES, write_return_read=True
        )

    def feed(self, data: bytes, target: Callable[[bytes], object]) -> None:
        def take(piece) -> None:
            self.received += len(piece)
            if self.received > self.digest.size_bytes:
                raise InvalidArgument(
                    f"blob {self.digest}: compressed data decompresses to at least "
                    f"{self.received} bytes, expected {self.digest.size_bytes}"
                )
            target(bytes(piece))

        self._sink.target = take
        try:
            self._writer.write(data)
        except zstandard.ZstdError as exc:
            raise InvalidArgument(
                f"blob {self.digest}: compressed data is not valid zstd ({exc})"
            ) from None
        finally:
            self._sink.target = None

    def decode(self, data: bytes) -> list[bytes]:
        """The pieces of output that `data`, the next compressed bytes, completes."""
        pieces: list[bytes] = []
        self.feed(data, pieces.append)
        return pieces

    def check_complete(self) -> None:
        """Raise `InvalidArgument` unless the output reached the blob's end."""
        if self.received != self.digest.size_bytes:
            raise InvalidArgument(
                f"blob {self.digest}: compressed data decompresses to {self.received} "
                f"bytes, expected {self.digest.size_bytes}"
            )


def decompress(digest: Digest, data: bytes) -> bytes:
    """A whole zstd-compressed blob, decoded; `InvalidArgument` unless it decodes to
    exactly `digest.size_bytes` bytes (the hash is the caller's to check)."""
    decoder = ZstdDecoder(digest)
    pieces = decoder.decode(data)
    decoder.check_complete()
    return b"".join(pieces)


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    """`data` cut into consecutive pieces of at most `size` bytes."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


class StreamCompressor:
    """The rest of a blob as one new zstd frame, handed out in pieces of at most `size`.

    `frame_size` is the uncompressed size the frame declares. Blocking: feed large data
    from a thread.
    """

    def __init__(self, frame_size: int, size: int) -> None:
        self._cobj = zstd_compressor().compressobj(size=max(frame_size, 0))
        self._size = size
        self._out = bytearray()

    def compress(self, data: bytes) -> list[bytes]:
        """The full pieces ready after `data`; a partial piece waits for more."""
        self._out += self._cobj.compress(data)
        return self._take(whole_only=True)

    def flush(self) -> list[bytes]:
        """The rest of the frame, in pieces."""
        self._out += self._cobj.flush()
        return self._take(whole_only=False)

    def _take(self, *, whole_only: bool) -> list[bytes]:
        end = len(self._out) - len(self._out) % self._size if whole_only else len(self._out)
        ready = [bytes(self._out[i : min(i + self._size, end)]) for i in range(0, end, self._size)]
        del self._out[:end]
        return ready


__all__ = [
    "PIECE_BYTES",
    "SUPPORTED_COMPRESSORS",
    "ZSTD",
    "ZSTD_LEVEL",
    "StreamCompressor",
    "ZstdDecoder",
    "check_compressor",
    "decompress",
    "pieces",
    "zstd_compressor",
]
