"""Content-addressed blob store on a local filesystem.

Where files live and how they are published: `expbuild.cas.layout`. Resumable uploads:
`expbuild.cas.uploads`. Compression: `expbuild.reapi.compression`.

What callers may rely on:

* Every blob the store accepts has been checked against its digest (SHA-256
  and size); a mismatch raises `InvalidArgument` and stores nothing.
* A blob file appears only by an atomic rename of a complete, verified
  temporary file, so readers never see a partial blob and any number of
  concurrent writers of the same blob all succeed. When it reaches the disk, and
  what an OS crash may do to it: `expbuild.cas.durability` (`[cas] fsync`).
* A blob that is already present is not rewritten (its mtime is bumped
  instead, which the LRU eviction reads as "recently used"). Reads (`get`,
  `get_many`, `read_chunks`) count as use too, but cheaply: they bump the mtime
  only when it is older than `READ_TOUCH_AGE`, so a hot blob costs no syscall
  per read (see `expbuild.cas.eviction`).
* The empty blob (`EMPTY`) is always present; no file backs it.
* Blob files are read-only (mode 0444); nothing may modify them in place.
* A file whose size differs from its digest's size counts as absent.
* No coroutine here blocks the event loop on disk I/O beyond a few stat calls,
  one small read or a few small writes: large work, and every write when each
  blob is fsynced (`[cas] fsync = "always"`), runs in worker threads via
  `asyncio.to_thread`, batched so a batch of blobs costs one thread hop. Lookups
  of up to `INLINE_LOOKUPS` digests, and reads and writes of up to
  `INLINE_BYTES` in all, run on the loop: a hop costs ~55 µs of CPU here, a stat
  ~7 µs and a small write without fsync ~30 µs (docs/performance.md), and a
  no-op action makes several of each.
* Blobs are stored uncompressed. Data may arrive or leave zstd-compressed (the
  REAPI `compressed-blobs` forms); compressed input is decompressed with bounded
  memory and verified against the digest of the uncompressed content.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path
from typing import BinaryIO

from expbuild.cas.layout import (
    COPY_CHUNK,
    STALE_TEMP_AGE,
    Layout,
    close_quiet,
    overflow_error,
    size_error,
    touch_if_stale,
    unlink_quiet,
    verify,
)
from expbuild.cas.uploads import MAX_IDLE_UPLOADS, UPLOAD_IDLE_TIMEOUT, Uploads, UploadSession
from expbuild.digest import EMPTY, Digest, new_hasher
from expbuild.errors import InvalidArgument, NotFound, OutOfRange
from expbuild.reapi.compression import (
    ZSTD,
    StreamCompressor,
    check_compressor,
    decompress,
    zstd_compressor,
)

DEFAULT_CHUNK_SIZE = 64 * 1024

# What runs on the event loop rather than in a thread (see the module docstring).
INLINE_LOOKUPS = 16
INLINE_BYTES = 64 * 1024


class FileStore:
    """A CAS kept as files under `root` (see the module docstring for the guarantees)."""

    def __init__(
        self,
        root: Path,
        *,
        fsync: str | bool = "batch",
        stale_temp_age: float = STALE_TEMP_AGE,
        upload_idle_timeout: float = UPLOAD_IDLE_TIMEOUT,
        max_idle_uploads: int = MAX_IDLE_UPLOADS,
    ) -> None:
        """Create the directories and remove temporary files older than `stale_temp_age`.

        `fsync` is `[cas] fsync`: "always", "batch" or "never" (True and False stand
        for "always" and "never"); see `expbuild.cas.durability` for what each promises.
        A store that finds it was written without fsync before an OS restart re-hashes
        the blobs of that window here and deletes the damaged ones.
        `upload_idle_timeout` and `max_idle_uploads` bound the unfinished resumable
        uploads kept (see `open_upload`).
        Construction does blocking I/O; build the store before serving.
        """
        if isinstance(fsync, bool):
            fsync = "always" if fsync else "never"
        self.layout = Layout(root, fsync=fsync)
        self.root, self.blob_dir, self.tmp_dir = (
            self.layout.root,
            self.layout.blob_dir,
            self.layout.tmp_dir,
        )
        self._uploads = Uploads(
            self.layout, idle_timeout=upload_idle_timeout, max_idle=max_idle_uploads
        )
        self.layout.remove_stale_temp_files(stale_temp_age)
        self.layout.durability.start()

    def close(self) -> None:
        """Flush what is not on disk yet and end this run's crash window (a clean stop)."""
        self.layout.durability.close()

    def path_of(self, digest: Digest) -> Path:
        """Where the blob's file lives (whether or not it exists). Never write to it."""
        return self.layout.path_of(digest)

    def on_loop(self, count: int, nbytes: int, *, writes: bool = False) -> bool:
        """Whether work on `count` blobs of `nbytes` in all is cheaper on the event loop
        than a thread hop (a write only when it is not fsynced there and then)."""
        if writes and self.layout.fsync:
            return False
        return count <= INLINE_LOOKUPS and nbytes <= INLINE_BYTES

    # --------------------------------------------------------------- presence

    async def has(self, digest: Digest) -> bool:
        """True if the blob is stored with the right size (always true for `EMPTY`)."""
        if digest == EMPTY:
            return True
        return self.layout.present(digest)  # one stat: cheaper than a thread hop

    async def find_missing(self, digests: Iterable[Digest], *, touch: bool = False) -> list[Digest]:
        """The digests that are not stored, in first-seen order, without duplicates.

        With `touch=True` the present blobs get their mtime bumped in the same pass,
        so LRU eviction does not drop a blob right after a client was told it exists.
        """
        unique = list(dict.fromkeys(digests))
        if all(d == EMPTY for d in unique):
            return []

        def scan() -> list[Digest]:
            return [d for d in unique if not self.layout.present(d, touch=touch)]

        if self.on_loop(len(unique), 0):
            return scan()
        return await asyncio.to_thread(scan)

    # ------------------------------------------- blocking, for one thread hop

    # For a caller that runs several steps (checks, reads, writes) in one thread hop of
    # its own; never call these on the event loop.

    def has_blocking(self, digest: Digest, *, touch: bool = False) -> bool:
        return self.layout.present(digest, touch=touch)

    def get_blocking(self, digest: Digest) -> bytes:
        """The blob's content; `NotFound` if absent."""
        return self._read_whole(digest)

    # ---------------------------------------------------------------- writing

    def _ingest(self, digest: Digest, chunks: Iterable[bytes]) -> bool:
        """Verify `chunks` against `digest` and store them; True if this call created the file.

        Blocking. Leaves no temporary file behind on any failure. A blob already present
        is not written again, but a client sending wrong content still hears about it.
        """
        present = digest.size_bytes == 0 or self.layout.present(digest, touch=True)
        tmp = None if present else self.layout.new_temp_path(digest)
        try:
            with open(tmp, "xb") if tmp is not None else contextlib.nullcontext() as f:
                hasher = new_hasher()
                received = 0
                for chunk in chunks:
                    received += len(chunk)
                    if received > digest.size_bytes:
                        raise overflow_error(digest, received)
                    hasher.update(chunk)
                    if f is not None:
                        f.write(chunk)
                verify(digest, received, hasher)
                if f is not None:
                    self.layout.finish_file(f)
            if tmp is not None:
                self.layout.publish(tmp, self.path_of(digest))
        except BaseException:
            unlink_quiet(tmp)
            raise
        return tmp is not None

    def put_blocking(self, digest: Digest, data: bytes) -> None:
        """`put` for a caller already on a worker thread (SplitBlob, `put_many`, a worker's
        inline blobs); `InvalidArgument` (storing nothing) if `data` does not match."""
        # The size check needs no I/O and spares writing a temp file that is bound to fail.
        if len(data) != digest.size_bytes:
            raise size_error(digest, len(data))
        self._ingest(digest, (data,))

    async def put(self, digest: Digest, data: bytes) -> None:
        """Store `data` as `digest`; idempotent.

        Raises `InvalidArgument` (and stores nothing) if `data` does not match `digest`,
        even when the blob is already present.
        """
        if len(data) != digest.size_bytes:
            raise size_error(digest, len(data))
        if self.on_loop(1, len(data), writes=True):
            self._ingest(digest, (data,))
        else:
            await asyncio.to_thread(self._ingest, digest, (data,))

    async def put_many(
        self, items: list[tuple[Digest, bytes] | tuple[Digest, bytes, str | None]]
    ) -> list[Exception | None]:
        """Store several small blobs in one thread hop, or none (for BatchUpdateBlobs).

        An item may carry a third element, the compressor its data is encoded with
        (None or "identity": uncompressed; "zstd"); the data is then decompressed and
        the result verified against the digest.

        Returns one entry per item, in order: None on success, else the exception
        (`InvalidArgument` for a content mismatch, bad compressed data or an unsupported
        compressor, `OSError` for a disk problem). One item failing does not affect the others.
        """

        def run() -> list[Exception | None]:
            results: list[Exception | None] = []
            for item in items:
                digest, data = item[0], item[1]
                try:
                    if len(item) > 2 and check_compressor(item[2]) is not None:
                        data = decompress(digest, data)
                    self.put_blocking(digest, data)
                except Exception as exc:  # noqa: BLE001 - each item gets its own status
                    results.append(exc)
                else:
                    results.append(None)
            return results

        if not items:
            return []
        plain = all(len(item) < 3 or item[2] in (None, "", "identity") for item in items)
        if plain and self.on_loop(len(items), sum(len(item[1]) for item in items), writes=True):
            return run()
        return await asyncio.to_thread(run)

    # ---------------------------------------------------------------- reading

    def _read_whole(self, digest: Digest) -> bytes:
        if digest == EMPTY:
            return b""
        try:
            with open(self.path_of(digest), "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size != digest.size_bytes:
                    raise NotFound(f"blob {digest} not found (stored file has the wrong size)")
                touch_if_stale(f, st)
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"blob {digest} not found") from None

    async def get(self, digest: Digest) -> bytes:
        """The blob's whole content; `NotFound` if absent. Reads it all into memory."""
        if digest == EMPTY:
            return b""
        if self.on_loop(1, digest.size_bytes):
            return self._read_whole(digest)
        return await asyncio.to_thread(self._read_whole, digest)

    async def get_many(
        self, digests: list[Digest], *, compressor: str | None = None
    ) -> list[bytes | Exception]:
        """Read several small blobs in one thread hop (for BatchReadBlobs and GetTree).

        Returns one entry per digest, in order: the content, compressed with
        `compressor` if one is given, else the exception (`NotFound` if absent,
        `OSError` for a disk problem). Raises `InvalidArgument` for an unsupported
        compressor.
        """
        compressor = check_compressor(compressor)
        if not digests:
            return []

        def run() -> list[bytes | Exception]:
            cctx = zstd_compressor() if compressor == ZSTD else None
            results: list[bytes | Exception] = []
            for digest in digests:
                try:
                    data = self._read_whole(digest)
                except Exception as exc:  # noqa: BLE001 - each item gets its own status
                    results.append(exc)
                else:
                    results.append(cctx.compress(data) if cctx is not None else data)
            return results

        if compressor is None and self.on_loop(len(digests), sum(d.size_bytes for d in digests)):
            return run()
        return await asyncio.to_thread(run)

    async def read_compressed(
        self,
        digest: Digest,
        offset: int = 0,
        compressor: str = ZSTD,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> AsyncGenerator[bytes, None]:
        """Yield the blob's bytes from `offset` to the end, compressed as one stream.

        `offset` counts uncompressed bytes (the REAPI rule for compressed reads). The
        pieces are at most `chunk_size` bytes; their concatenation is a complete zstd
        frame (also for an empty range). Errors as for `read_chunks`, raised before
        any data; `InvalidArgument` for a compressor that is not supported.
        """
        if check_compressor(compressor) is None:
            raise InvalidArgument("read_compressed needs a compressor; use read_chunks")
        if chunk_size < 1:
            raise InvalidArgument(f"chunk size {chunk_size} must be positive")
        stream = StreamCompressor(digest.size_bytes - max(offset, 0), chunk_size)
        source = self.read_chunks(digest, offset, 0, chunk_size=COPY_CHUNK)
        async with contextlib.aclosing(source):
            async for data in source:
                for piece in await asyncio.to_thread(stream.compress, data):
                    yield piece
        for piece in stream.flush():
            yield piece

    # ------------------------------------------------------ resumable uploads

    async def open_upload(
        self, upload_id: str, digest: Digest, compressor: str | None = None
    ) -> UploadSession:
        """Start or continue the resumable upload `upload_id` of `digest` (ByteStream
        Write); see `Uploads.open`."""
        return await self._uploads.open(upload_id, digest, compressor)

    async def upload_status(
        self, upload_id: str, digest: Digest, compressor: str | None = None
    ) -> tuple[int, bool]:
        """(committed_size, complete) of an upload, as QueryWriteStatus reports it; see
        `Uploads.status`."""
        return await self._uploads.status(upload_id, digest, compressor)

    # ---------------------------------------------------------------- reading

    async def read_chunks(
        self,
        digest: Digest,
        offset: int = 0,
        limit: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> AsyncGenerator[bytes, None]:
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
                st = os.fstat(f.fileno())
                if st.st_size != size:
                    raise NotFound(f"blob {digest} not found (stored file has the wrong size)")
                if offset > size:
                    raise out_of_range()
                touch_if_stale(f, st)
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
            close_quiet(f)


__all__ = ["DEFAULT_CHUNK_SIZE", "FileStore"]
