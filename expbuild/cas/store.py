"""Content-addressed blob store on a local filesystem.

Layout under the root directory::

    sha256/<first two hex chars>/<hash>   one file per blob
    tmp/<hash>.<uuid4 hex>                blobs being written

What callers may rely on:

* Every blob the store accepts has been checked against its digest (SHA-256
  and size); a mismatch raises `InvalidArgument` and stores nothing.
* A blob file appears only by an atomic rename of a complete, verified and
  fsynced temporary file, so readers never see a partial blob and any number
  of concurrent writers of the same blob all succeed.
* A blob that is already present is not rewritten (its mtime is bumped
  instead, which the LRU eviction reads as "recently used").
* The empty blob (`EMPTY`) is always present; no file backs it.
* Blob files are read-only (mode 0444); nothing may modify them in place.
* A file whose size differs from its digest's size counts as absent.
* No coroutine here blocks the event loop on disk I/O: the work runs in
  worker threads via `asyncio.to_thread`, batched so a small blob or a batch
  of digests costs one thread hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Self

from expbuild.digest import EMPTY, HASH_NAME, Digest, new_hasher
from expbuild.errors import InvalidArgument, NotFound, OutOfRange

DEFAULT_CHUNK_SIZE = 64 * 1024
STALE_TEMP_AGE = 3600.0
"""Seconds after which a temporary file is taken to be left over by a crashed process."""

# A BlobWriter keeps incoming chunks in memory until this many bytes are pending, then hands
# them to a thread in one go: a small blob streamed in many pieces costs one thread hop.
_WRITE_BUFFER = 1024 * 1024
_COPY_CHUNK = 1024 * 1024
_BLOB_MODE = 0o444


def _size_error(digest: Digest, received: int) -> InvalidArgument:
    return InvalidArgument(
        f"blob {digest}: received {received} bytes, expected {digest.size_bytes}"
    )


def _overflow_error(digest: Digest, received: int) -> InvalidArgument:
    return InvalidArgument(
        f"blob {digest}: received at least {received} bytes, expected {digest.size_bytes}"
    )


def _verify(digest: Digest, received: int, hasher) -> None:
    """Raise `InvalidArgument` unless `received` bytes hashing to `hasher` match `digest`."""
    if received != digest.size_bytes:
        raise _size_error(digest, received)
    actual = hasher.hexdigest()
    if actual != digest.hash:
        raise InvalidArgument(f"blob {digest}: content hashes to {actual}, not {digest.hash}")


def _unlink_quiet(path: Path | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _close_quiet(f: BinaryIO | None) -> None:
    if f is None:
        return
    try:
        f.close()
    except OSError:
        pass


def _read_file_chunks(f: BinaryIO) -> Iterator[bytes]:
    return iter(lambda: f.read(_COPY_CHUNK), b"")


class FileStore:
    """A CAS kept as files under `root` (see the module docstring for the guarantees)."""

    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        stale_temp_age: float = STALE_TEMP_AGE,
    ) -> None:
        """Create the directories and remove temporary files older than `stale_temp_age`.

        `fsync=False` skips the fsync of blob files and directories: faster, but a
        machine crash may leave a truncated blob behind. Meant for tests only.
        Construction does blocking I/O; build the store before serving.
        """
        self.root = Path(root)
        self.blob_dir = self.root / HASH_NAME
        self.tmp_dir = self.root / "tmp"
        self._fsync = fsync
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temp_files(stale_temp_age)

    # ----------------------------------------------------------------- layout

    def path_of(self, digest: Digest) -> Path:
        """Where the blob's file lives (whether or not it exists). Never write to it."""
        return self.blob_dir / digest.hash[:2] / digest.hash

    def _new_temp_path(self, digest: Digest) -> Path:
        return self.tmp_dir / f"{digest.hash}.{uuid.uuid4().hex}"

    def remove_stale_temp_files(self, max_age: float = STALE_TEMP_AGE) -> int:
        """Delete temporary files not modified for `max_age` seconds; return how many.

        Blocking; called by the constructor. A live writer's temp file is only
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

    # --------------------------------------------------------------- presence

    def _present(self, digest: Digest, *, touch: bool = False) -> bool:
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

    async def has(self, digest: Digest) -> bool:
        """True if the blob is stored with the right size (always true for `EMPTY`)."""
        if digest == EMPTY:
            return True
        return await asyncio.to_thread(self._present, digest)

    async def find_missing(self, digests: Iterable[Digest], *, touch: bool = False) -> list[Digest]:
        """The digests that are not stored, in first-seen order, without duplicates.

        With `touch=True` the present blobs get their mtime bumped in the same pass,
        so LRU eviction does not drop a blob right after a client was told it exists.
        """
        unique = list(dict.fromkeys(digests))
        if all(d == EMPTY for d in unique):
            return []

        def scan() -> list[Digest]:
            return [d for d in unique if not self._present(d, touch=touch)]

        return await asyncio.to_thread(scan)

    async def touch(self, digests: Iterable[Digest]) -> None:
        """Bump the mtime (and atime) of the stored blobs among `digests`; absent ones are skipped."""
        unique = [d for d in dict.fromkeys(digests) if d != EMPTY]
        if not unique:
            return

        def bump() -> None:
            for d in unique:
                try:
                    os.utime(self.path_of(d))
                except (FileNotFoundError, NotADirectoryError):
                    pass

        await asyncio.to_thread(bump)

    # ---------------------------------------------------------------- writing

    def _finish_file(self, f: BinaryIO) -> None:
        f.flush()
        os.fchmod(f.fileno(), _BLOB_MODE)
        if self._fsync:
            os.fsync(f.fileno())

    def _publish(self, tmp: Path, final: Path) -> None:
        """Atomically move a finished temp file into place."""
        try:
            os.replace(tmp, final)
        except FileNotFoundError:
            # The shard directory is made on first use (or was removed by eviction).
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        if self._fsync:
            # Persist the directory entry too; best effort where directories can't be fsynced.
            try:
                fd = os.open(final.parent, os.O_RDONLY)
            except OSError:
                return
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)

    def _ingest(self, digest: Digest, chunks: Iterable[bytes]) -> bool:
        """Verify `chunks` against `digest` and store them; True if this call created the file.

        Blocking. Leaves no temporary file behind on any failure.
        """
        if digest.size_bytes == 0 or self._present(digest, touch=True):
            # Nothing to write, but a client sending wrong content must still hear about it.
            hasher = new_hasher()
            received = 0
            for chunk in chunks:
                received += len(chunk)
                if received > digest.size_bytes:
                    raise _overflow_error(digest, received)
                hasher.update(chunk)
            _verify(digest, received, hasher)
            return False

        tmp = self._new_temp_path(digest)
        try:
            with open(tmp, "xb") as f:
                hasher = new_hasher()
                received = 0
                for chunk in chunks:
                    received += len(chunk)
                    if received > digest.size_bytes:
                        raise _overflow_error(digest, received)
                    hasher.update(chunk)
                    f.write(chunk)
                _verify(digest, received, hasher)
                self._finish_file(f)
            self._publish(tmp, self.path_of(digest))
        except BaseException:
            _unlink_quiet(tmp)
            raise
        return True

    def _put_checked(self, digest: Digest, data: bytes) -> None:
        # The size check needs no I/O and spares writing a temp file that is bound to fail.
        if len(data) != digest.size_bytes:
            raise _size_error(digest, len(data))
        self._ingest(digest, (data,))

    async def put(self, digest: Digest, data: bytes) -> None:
        """Store `data` as `digest`; idempotent.

        Raises `InvalidArgument` (and stores nothing) if `data` does not match `digest`,
        even when the blob is already present.
        """
        if len(data) != digest.size_bytes:
            raise _size_error(digest, len(data))
        await asyncio.to_thread(self._ingest, digest, (data,))

    async def put_many(self, items: list[tuple[Digest, bytes]]) -> list[Exception | None]:
        """Store several small blobs in one thread hop (for BatchUpdateBlobs).

        Returns one entry per item, in order: None on success, else the exception
        (`InvalidArgument` for a content mismatch, `OSError` for a disk problem).
        One item failing does not affect the others.
        """

        def run() -> list[Exception | None]:
            results: list[Exception | None] = []
            for digest, data in items:
                try:
                    self._put_checked(digest, data)
                except Exception as exc:  # noqa: BLE001 - each item gets its own status
                    results.append(exc)
                else:
                    results.append(None)
            return results

        if not items:
            return []
        return await asyncio.to_thread(run)

    async def put_file(self, digest: Digest, path: Path) -> None:
        """Store the content of the local file `path` as `digest`, streaming it.

        The file is read whole even when the blob is present, so a mismatch is always
        reported (`InvalidArgument`); call `has` first to skip the read. A missing or
        unreadable `path` raises the `OSError` from opening it.
        """

        def run() -> None:
            with open(path, "rb") as src:
                size = os.fstat(src.fileno()).st_size
                if size != digest.size_bytes:
                    raise _size_error(digest, size)
                self._ingest(digest, _read_file_chunks(src))

        await asyncio.to_thread(run)

    def begin_write(self, digest: Digest) -> BlobWriter:
        """Start a streaming write of `digest` (for ByteStream.Write). Does no I/O.

        Use as ``async with store.begin_write(d) as w: await w.write(...)``: a normal
        exit commits, an exception aborts. To skip uploads of blobs already stored,
        check `has` before starting.
        """
        return BlobWriter(self, digest)

    # ---------------------------------------------------------------- reading

    async def get(self, digest: Digest) -> bytes:
        """The blob's whole content; `NotFound` if absent. Reads it all into memory."""
        if digest == EMPTY:
            return b""

        def run() -> bytes:
            try:
                with open(self.path_of(digest), "rb") as f:
                    if os.fstat(f.fileno()).st_size != digest.size_bytes:
                        raise NotFound(f"blob {digest} not found (stored file has the wrong size)")
                    return f.read()
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"blob {digest} not found") from None

        return await asyncio.to_thread(run)

    async def read_chunks(
        self,
        digest: Digest,
        offset: int = 0,
        limit: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> AsyncIterator[bytes]:
        """Yield the blob's bytes from `offset`, at most `limit` of them (0: to the end).

        An async generator: errors surface on the first iteration, before any data.
        `NotFound` if the blob is absent; `OutOfRange` if `offset` is negative or
        past the end (the ByteStream rule); `InvalidArgument` for a negative `limit`
        or a `chunk_size` < 1. `offset == size` yields nothing. Chunks are at most
        `chunk_size` bytes and never empty.
        """
        size = digest.size_bytes
        if offset < 0:
            raise OutOfRange(f"read offset {offset} of blob {digest} is negative")
        if limit < 0:
            raise InvalidArgument(f"read limit {limit} of blob {digest} is negative")
        if chunk_size < 1:
            raise InvalidArgument(f"chunk size {chunk_size} must be positive")
        remaining = max(size - offset, 0)
        if limit:
            remaining = min(remaining, limit)

        def out_of_range() -> OutOfRange:
            return OutOfRange(
                f"read offset {offset} is past the end of blob {digest} ({size} bytes)"
            )

        if digest == EMPTY:
            if offset > 0:
                raise out_of_range()
            return

        def open_and_read_first() -> tuple[BinaryIO | None, bytes]:
            # Opening and the first read share one thread hop; a blob that fits in one
            # chunk is read and closed right here.
            try:
                f = open(self.path_of(digest), "rb")  # noqa: SIM115 - stays open across chunks
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"blob {digest} not found") from None
            try:
                if os.fstat(f.fileno()).st_size != size:
                    raise NotFound(f"blob {digest} not found (stored file has the wrong size)")
                if offset > size:
                    raise out_of_range()
                f.seek(offset)
                first = f.read(min(chunk_size, remaining)) if remaining else b""
                if len(first) >= remaining:
                    f.close()
                    return None, first
                return f, first
            except BaseException:
                f.close()
                raise

        f, first = await asyncio.to_thread(open_and_read_first)
        try:
            remaining -= len(first)
            if first:
                yield first
            while remaining > 0:
                assert f is not None
                data = await asyncio.to_thread(f.read, min(chunk_size, remaining))
                if not data:
                    # Blob files are never truncated in place; this means outside tampering.
                    raise NotFound(f"blob {digest} ended early while being read")
                remaining -= len(data)
                yield data
        finally:
            # Closing a read-only file does not wait on the disk, so it is done inline;
            # awaiting here would be unsafe while the generator is being closed.
            _close_quiet(f)


class BlobWriter:
    """One streaming upload of a blob, from `FileStore.begin_write`.

    Chunks are hashed and written to a temporary file as they arrive; `commit`
    verifies hash and size and publishes the blob atomically. A writer that is
    neither committed nor aborted leaves a temp file that the next store
    construction removes once stale. Not safe for concurrent use by several tasks.
    """

    def __init__(self, store: FileStore, digest: Digest) -> None:
        self.digest = digest
        self._store = store
        self._hasher = new_hasher()
        self._received = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._tmp: Path | None = None
        self._file: BinaryIO | None = None
        self._state = "open"  # open -> committing -> committed, or -> aborted
        self._stored_new = False
        self._used_thread = False
        # Serialises the thread-side work: after a cancellation, abort's thread must not
        # race a write or commit that is still running in another thread.
        self._lock = threading.Lock()

    @property
    def committed_size(self) -> int:
        """Bytes accepted so far (what ByteStream reports as committed_size)."""
        return self._received

    @property
    def done(self) -> bool:
        """True once committed or aborted."""
        return self._state in ("committed", "aborted")

    async def write(self, chunk: bytes) -> None:
        """Append `chunk`.

        Raises `InvalidArgument` after commit or abort, and, aborting the writer,
        as soon as more bytes arrive than the digest's size.
        """
        if self._state != "open":
            raise InvalidArgument(f"blob {self.digest}: write after the upload was {self._state}")
        if not chunk:
            return
        received = self._received + len(chunk)
        if received > self.digest.size_bytes:
            # Fail early so an oversized upload cannot fill the disk.
            await self.abort()
            raise _overflow_error(self.digest, received)
        self._pending.append(bytes(chunk))  # copy a bytearray/memoryview the caller may reuse
        self._pending_size += len(chunk)
        self._received = received
        if self._pending_size >= _WRITE_BUFFER:
            pending = self._take_pending()
            self._used_thread = True
            await asyncio.to_thread(self._flush, pending)

    async def commit(self) -> bool:
        """Verify and publish the blob; True if this writer stored it, False if it was present.

        Raises `InvalidArgument` naming the digest if size or hash differ (the writer
        is then aborted and no file is left). Calling it again after success is a no-op.
        """
        if self._state == "committed":
            return self._stored_new
        if self._state != "open":
            raise InvalidArgument(f"blob {self.digest}: commit after the upload was {self._state}")
        if self._received != self.digest.size_bytes:
            await self.abort()
            raise _size_error(self.digest, self._received)
        pending = self._take_pending()
        self._state = "committing"
        self._used_thread = True
        try:
            stored = await asyncio.to_thread(self._commit, pending)
        except BaseException:
            # _commit cleans up after itself; on cancellation the thread may still be
            # running, and a later abort() waits for it through the lock.
            if self._state == "committing":
                self._state = "aborted"
            raise
        self._state = "committed"
        self._stored_new = stored
        return stored

    async def abort(self) -> None:
        """Discard the upload and its temp file. Idempotent; a no-op after commit."""
        if self._state == "committed":
            return
        # Also runs when already aborted: after a cancelled commit, its thread may still
        # hold a temp file, and _discard waits for it through the lock.
        self._state = "aborted"
        self._pending = []
        self._pending_size = 0
        if self._used_thread:
            await asyncio.to_thread(self._discard)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            await self.commit()
        else:
            # The original exception matters more than a failed cleanup.
            with contextlib.suppress(OSError):
                await self.abort()
        return False

    # Thread side. Each method checks the state under the lock, so work dispatched
    # before an abort does nothing once the abort has run.

    def _take_pending(self) -> list[bytes]:
        pending = self._pending
        self._pending = []
        self._pending_size = 0
        return pending

    def _open_temp(self) -> BinaryIO:
        if self._file is None:
            tmp = self._store._new_temp_path(self.digest)
            self._file = open(tmp, "xb")  # noqa: SIM115 - stays open across writes
            self._tmp = tmp
        return self._file

    def _flush(self, pending: list[bytes]) -> None:
        with self._lock:
            if self._state == "aborted":
                return
            f = self._open_temp()
            for chunk in pending:
                self._hasher.update(chunk)
                f.write(chunk)

    def _commit(self, pending: list[bytes]) -> bool:
        with self._lock:
            if self._state == "aborted":
                raise InvalidArgument(f"blob {self.digest}: upload was aborted")
            try:
                for chunk in pending:
                    self._hasher.update(chunk)
                _verify(self.digest, self._received, self._hasher)
                store = self._store
                if self.digest.size_bytes == 0 or store._present(self.digest, touch=True):
                    self._discard_locked()
                    return False
                f = self._open_temp()
                for chunk in pending:
                    f.write(chunk)
                store._finish_file(f)
                f.close()
                self._file = None
                store._publish(self._tmp, store.path_of(self.digest))
                self._tmp = None
                return True
            except BaseException:
                self._discard_locked()
                raise

    def _discard(self) -> None:
        with self._lock:
            self._discard_locked()

    def _discard_locked(self) -> None:
        _close_quiet(self._file)
        self._file = None
        _unlink_quiet(self._tmp)
        self._tmp = None


__all__ = ["DEFAULT_CHUNK_SIZE", "STALE_TEMP_AGE", "BlobWriter", "FileStore"]
