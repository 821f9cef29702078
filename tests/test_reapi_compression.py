"""The one zstd decoder that the store and the client share."""

from __future__ import annotations

import os

import pytest
import zstandard

from expbuild.digest import Digest, digest_of
from expbuild.errors import InvalidArgument
from expbuild.reapi.compression import (
    PIECE_BYTES,
    StreamCompressor,
    ZstdDecoder,
    check_compressor,
    decompress,
)

DATA = b"compressible " * 100_000  # 1.3 MB


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def test_check_compressor():
    assert check_compressor(None) is None
    assert check_compressor("") is None
    assert check_compressor("identity") is None
    assert check_compressor("zstd") == "zstd"
    with pytest.raises(InvalidArgument, match="'lz4' is not supported.*zstd"):
        check_compressor("lz4")


def test_streaming_decode_in_bounded_pieces():
    digest = digest_of(DATA)
    decoder = ZstdDecoder(digest)
    compressed = zstd(DATA)
    out: list[bytes] = []
    for i in range(0, len(compressed), 1000):  # fed in small bits, as a stream arrives
        decoder.feed(compressed[i : i + 1000], out.append)
    decoder.check_complete()
    assert b"".join(out) == DATA
    assert all(0 < len(piece) <= PIECE_BYTES for piece in out)
    # Fed at once, the output comes in whole pieces of the configured size.
    whole = ZstdDecoder(digest).decode(compressed)
    assert [len(piece) for piece in whole[:-1]] == [PIECE_BYTES] * (len(whole) - 1)


def test_concatenated_frames_and_an_offset():
    digest = digest_of(DATA)
    # A resumed stream: the rest of the blob from offset 1000, as a new stream of two frames.
    decoder = ZstdDecoder(digest, offset=1000)
    rest = zstd(DATA[1000:500_000]) + zstd(DATA[500_000:])
    assert b"".join(decoder.decode(rest)) == DATA[1000:]
    decoder.check_complete()


def test_a_bomb_stops_after_one_piece():
    small = Digest(digest_of(b"x").hash, 10)
    decoder = ZstdDecoder(small)
    seen: list[bytes] = []
    with pytest.raises(InvalidArgument, match="decompresses to at least"):
        decoder.feed(zstd(bytes(50 * 1024 * 1024)), seen.append)
    assert seen == []  # the first piece was already too much


def test_bad_data_and_short_output():
    digest = digest_of(DATA)
    with pytest.raises(InvalidArgument, match="not valid zstd"):
        decompress(digest, b"this is not zstd at all")
    with pytest.raises(InvalidArgument, match=f"decompresses to 100 bytes, expected {len(DATA)}"):
        decompress(digest, zstd(DATA[:100]))
    assert decompress(digest, zstd(DATA)) == DATA


def test_stream_compressor_pieces_make_one_frame():
    data = os.urandom(100_000) + DATA
    stream = StreamCompressor(len(data), 4096)
    pieces = [p for i in range(0, len(data), 65536) for p in stream.compress(data[i : i + 65536])]
    pieces += stream.flush()
    assert all(0 < len(p) <= 4096 for p in pieces)
    assert all(len(p) == 4096 for p in pieces[:-1])
    assert zstandard.ZstdDecompressor().decompress(b"".join(pieces)) == data
