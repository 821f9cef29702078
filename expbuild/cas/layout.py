"""Where the filesystem CAS keeps what, and the file operations every writer shares.

Layout under the root directory::

    sha256/<first two hex chars>/<hash>   one file per blob (mode 0444, never modified)
    tmp/<hash>.<uuid4 hex>                blobs being written
    tmp/upload-<key>                      partial data of a resumable upload

A blob file appears only by an atomic rename of a complete, verified temporary file,
fsynced first or flushed later as `[cas] fsync` says (`expbuild.cas.durability`).
Everything here is blocking; the store calls it from worker threads.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from expbuild.cas.durability import Durability, fsync_directory
from expbuild.digest import EMPTY, HASH_NAME, Digest
from expbuild.errors import InvalidArgument

STALE_TEMP_AGE = 3600.0
"""Seconds after which a temporary file is taken to be left over by a crashed process."""
READ_TOUCH_AGE = 3600.0
"""A read bumps a blob's mtime (LRU "use") only if the mtime is older than this many seconds."""
COPY_CHUNK = 1024 * 1024
_BLOB_MODE = 0o444


def size_error(digest: Digest, received: int) -> InvalidArgument:
    return InvalidArgument(
        f"blob {digest}: received {received} bytes, expected {digest.size_bytes}"
    )


def overflow_error(digest: Digest, received: int) -> InvalidArgument:
    return InvalidArgument(
        f"blob {digest}: received at least {received} bytes, expected {digest.size_bytes}"
    )


def verify(digest: Digest, received: int, hasher) -> None:
    """Raise `InvalidArgument` unless `received` bytes hashing to `hasher` match `digest`."""
    if received != digest.size_bytes:
        raise size_error(digest, received)
    actual = hasher.hexdigest()
    if actual != digest.hash:
        raise InvalidArgument(f"blob {digest}: content hashes to {actual}, not {digest.hash}")


def unlink_quiet(path: Path | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def close_quiet(f: BinaryIO | None) -> None:
    if f is None:
        return
    try:
        f.close()
    except OSError:
        pass


def touch_if_stale(f: BinaryIO, st: os.stat_result) -> None:
    """Record a read as use for LRU eviction, at most once per `READ_TOUCH_AGE` per blob."""
    if st.st_mtime < time.time() - READ_TOUCH_AGE:
        # Through the descriptor: if eviction unlinked the file meanwhile, this is harmless.
        with contextlib.suppress(OSError):
            os.utime(f.fileno())


def read_file_chunks(f: BinaryIO) -> Iterator[bytes]:
    return iter(lambda: f.read(COPY_CHUNK), b"")


class Layout:
    """The directories of a CAS under `root`, created if need be."""

    def __init__(self, root: Path, *, fsync: str = "batch") -> None:
        self.root = Path(root)
        self.blob_dir = self.root / HASH_NAME
        self.tmp_dir = self.root / "tmp"
        self.durability = Durability(self.root, self.blob_dir, fsync)
        self.fsync = self.durability.fsync_each_blob
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path_of(self, digest: Digest) -> Path:
        """Where the blob's file lives (whether or not it exists). Never write to it."""
        return self.blob_dir / digest.hash[:2] / digest.hash

    def new_temp_path(self, digest: Digest) -> Path:
        return self.tmp_dir / f"{digest.hash}.{uuid.uuid4().hex}"

    def remove_stale_temp_files(self, max_age: float = STALE_TEMP_AGE) -> int:
        """Delete temporary files not modified for `max_age` seconds; return how many.

        Blocking; the store calls it when it is built. A live writer's temp file is only
        touched when it writes, so do not use a `max_age` shorter than the longest
        pause a client may take in the middle of an upload.
        """
        cutoff = time.time() - max_age
        removed = 0
        with os.scandir(self.tmp_dir) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass  # another process cleaned it up first
        return removed

    def upload_path(self, key: str) -> Path:
        return self.tmp_dir / f"upload-{key}"

    def present(self, digest: Digest, *, touch: bool = False) -> bool:
        if digest == EMPTY:
            return True
        path = self.path_of(digest)
        try:
            st = os.stat(path)
            present = stat.S_ISREG(st.st_mode) and st.st_size == digest.size_bytes
            if present and touch:
                os.utime(path)
        except (FileNotFoundError, NotADirectoryError):
            return False  # also covers eviction removing it between stat and utime
        return present

    def finish_file(self, f: BinaryIO) -> None:
        f.flush()
        os.fchmod(f.fileno(), _BLOB_MODE)
        if self.fsync:
            os.fsync(f.fileno())

    def publish(self, tmp: Path, final: Path) -> None:
        """Atomically move a finished temp file into place."""
        try:
            os.replace(tmp, final)
        except FileNotFoundError:
            # The shard directory is made on first use (or was removed by eviction).
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        if self.fsync:
            fsync_directory(final.parent)  # the directory entry too
        else:
            self.durability.dirty = True


__all__ = [
    "COPY_CHUNK",
    "READ_TOUCH_AGE",
    "STALE_TEMP_AGE",
    "Layout",
    "close_quiet",
    "overflow_error",
    "read_file_chunks",
    "size_error",
    "touch_if_stale",
    "unlink_quiet",
    "verify",
]
