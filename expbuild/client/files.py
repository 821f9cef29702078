"""Local files on either side of a transfer: reading what is uploaded (refusing a file
that changed since it was hashed) and publishing what is downloaded atomically."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from pathlib import Path

from expbuild.digest import Digest
from expbuild.errors import InvalidArgument

CHUNK_BYTES = 1024 * 1024
"""The most data in one ByteStream message the client sends."""


def read_local(digest: Digest, source: bytes | Path) -> bytes:
    """The bytes of a small blob to upload, refusing a file that changed since it was hashed.
    Blocking."""
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        data = f.read(digest.size_bytes + 1)
    if len(data) != digest.size_bytes:
        raise InvalidArgument(
            f"{source} changed after it was hashed: it has {len(data)} bytes now, "
            f"blob {digest} expects {digest.size_bytes}"
        )
    return data


async def local_chunks(
    source: bytes | Path, size: int, problem: list[str], offset: int = 0
) -> AsyncGenerator[bytes, None]:
    """The blob's bytes from `offset` to `size`, in chunks of `CHUNK_BYTES`. A source that
    does not have `size` bytes ends early and says why in `problem`."""
    if isinstance(source, bytes):
        view = memoryview(source)[offset:size]
        for start in range(0, len(view), CHUNK_BYTES):
            yield bytes(view[start : start + CHUNK_BYTES])
        if len(source) != size:
            problem.append(f"blob data has {len(source)} bytes, its digest says {size}")
        return
    f = await asyncio.to_thread(open, source, "rb")
    try:
        if offset:
            await asyncio.to_thread(f.seek, offset)
        remaining = size - offset
        while remaining > 0:
            chunk = await asyncio.to_thread(f.read, min(CHUNK_BYTES, remaining))
            if not chunk:
                problem.append(
                    f"{source} changed after it was hashed: it ended after "
                    f"{size - remaining} bytes, its digest says {size}"
                )
                return
            remaining -= len(chunk)
            yield chunk
    finally:
        await asyncio.to_thread(f.close)


def temp_path_for(path: Path, unique: str) -> Path:
    """Where a download to `path` is written before it is complete."""
    return path.with_name(f".{path.name}.expbuild-{unique}")


def write_new_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)


def publish(temp: Path, path: Path, mode: int) -> None:
    """Give the finished `temp` its mode and move it over `path`. Blocking."""
    # chmod, not the umask-filtered open() mode: the executable bit must survive any umask.
    os.chmod(temp, mode)
    os.replace(temp, path)


__all__ = [
    "CHUNK_BYTES",
    "local_chunks",
    "publish",
    "read_local",
    "temp_path_for",
    "write_new_file",
]
