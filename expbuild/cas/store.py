"""Content-addressed blob store on a local filesystem.

Layout under the root directory::

    sha256/<first two hex chars>/<hash>   one file per blob
    tmp/<hash>.<uuid4 hex>                blobs being written
    tmp/upload-<key>                      partial data of a resumable upload (`open_upload`)

What callers may rely on:

* Every blob the store accepts has been checked against its digest (SHA-256
  and size); a mismatch raises `InvalidArgument` and stores nothing.
* A blob file appears only by an atomic rename of a complete, verified and
  fsynced temporary file, so readers never see a partial blob and any number
  of concurrent writers of the same blob all succeed.
* A blob that is already present is not rewritten (its mtime is bumped
  instead, which the LRU eviction reads as "recently used"). Reads (`get`,
  `get_many`, `read_chunks`) count as use too, but cheaply: they bump the mtime
  only when it is older than `READ_TOUCH_AGE`, so a hot blob costs no syscall
  per read (see `expbuild.cas.eviction`).
* The empty blob (`EMPTY`) is always present; no file backs it.
* Blob files are read-only (mode 0444); nothing may modify them in place.
* A file whose size differs from its digest's size counts as absent.
* No coroutine here blocks the event loop on disk I/O: the work runs in
  worker threads via `asyncio.to_thread`, batched so a small blob or a batch
  of digests costs one thread hop.
* Blobs are stored uncompressed. Data may arrive or leave zstd-compressed (the
  REAPI `compressed-blobs` forms); compressed input is decompressed with bounded
  memory and verified against the digest of the uncompressed content.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

from expbuild.digest import EMPTY, HASH_NAME, Digest, new_hasher
from expbuild.errors import InvalidArgument, NotFound, OutOfRange

DEFAULT_CHUNK_SIZE = 64 * 1024
STALE_TEMP_AGE = 3600.0
"""Seconds after which a temporary file is taken to be left over by a crashed process."""

# An upload keeps incoming chunks in memory until this many bytes are pending, then hands
# them to a thread in one go: a small blob streamed in many pieces costs one thread hop.
_WRITE_BUFFER = 1024 * 1024
_COPY_CHUNK = 1024 * 1024
_BLOB_MODE = 0o444

READ_TOUCH_AGE = 3600.0
"""A read bumps a blob's mtime (LRU "use") only if the mtime is older than this many seconds."""

UPLOAD_IDLE_TIMEOUT = 900.0
"""Seconds after which an unfinished upload nobody writes to may be dropped (see `open_upload`)."""
MAX_IDLE_UPLOADS = 256
"""Unfinished uploads kept for resumption beyond which the least recently used idle ones are dropped."""

ZSTD = "zstd"
SUPPORTED_COMPRESSORS: tuple[str, ...] = (ZSTD,)
"""Compressors the store decodes and encodes, spelled as in REAPI resource names."""
_ZSTD_LEVEL = 3


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


def _touch_if_stale(f: BinaryIO, st: os.stat_result) -> None:
    """Record a read as use for LRU eviction, at most once per `READ_TOUCH_AGE` per blob."""
    if st.st_mtime < time.time() - READ_TOUCH_AGE:
        # Through the descriptor: if eviction unlinked the file meanwhile, this is harmless.
        with contextlib.suppress(OSError):
            os.utime(f.fileno())


def _read_file_chunks(f: BinaryIO) -> Iterator[bytes]:
    return iter(lambda: f.read(_COPY_CHUNK), b"")


# ------------------------------------------------------------- compression


def check_compressor(compressor: str | None) -> str | None:
    """Normalise a compressor name: None, "" or "identity" mean uncompressed (None).

    Raises `InvalidArgument` naming the supported ones for anything else unknown.
    """
    if compressor is None or compressor in ("", "identity"):
        return None
    if compressor in SUPPORTED_COMPRESSORS:
        return compressor
    raise InvalidArgument(
        f"compressor {compressor!r} is not supported; this server supports "
        f"{', '.join(SUPPORTED_COMPRESSORS)} and uncompressed data"
    )


def _decompressed_overflow(digest: Digest, received: int) -> InvalidArgument:
    return InvalidArgument(
        f"blob {digest}: compressed data decompresses to at least {received} bytes, "
        f"expected {digest.size_bytes}"
    )


def _decompressed_size_error(digest: Digest, received: int) -> InvalidArgument:
    return InvalidArgument(
        f"blob {digest}: compressed data decompresses to {received} bytes, "
        f"expected {digest.size_bytes}"
    )


class _Sink:
    """The file-like object zstandard's stream writer writes to; forwards to `target`."""

    __slots__ = ("target",)

    def __init__(self) -> None:
        self.target = None

    def write(self, data) -> int:
        self.target(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _ZstdDecoder:
    """Streaming zstd decompression that hands output on in pieces of at most 1 MiB.

    `feed(data, target)` calls `target(piece)` as output is produced, so a target that
    raises once too much has arrived stops a decompression bomb after at most one piece.
    Concatenated frames are accepted; anything that is not zstd raises `InvalidArgument`.
    """

    def __init__(self, digest: Digest) -> None:
        self._digest = digest
        self._sink = _Sink()
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            self._sink, write_size=_COPY_CHUNK, write_return_read=True
        )

    def feed(self, data: bytes, target) -> None:
        self._sink.target = target
        try:
            self._writer.write(data)
        except zstandard.ZstdError as exc:
            raise InvalidArgument(
                f"blob {self._digest}: compressed data is not valid zstd ({exc})"
            ) from None
        finally:
            self._sink.target = None


def _decompress(digest: Digest, data: bytes, compressor: str) -> bytes:
    """Decompress a whole blob, refusing more output than `digest` says. Blocking."""
    if check_compressor(compressor) is None:
        return data
    parts: list[bytes] = []
    received = 0

    def take(piece) -> None:
        nonlocal received
        received += len(piece)
        if received > digest.size_bytes:
            raise _decompressed_overflow(digest, received)
        parts.append(bytes(piece))

    _ZstdDecoder(digest).feed(data, take)
    if received != digest.size_bytes:
        raise _decompressed_size_error(digest, received)
    return b"".join(parts)


def _compressor_for(compressor: str | None):
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL) if compressor == ZSTD else None


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _upload_key(upload_id: str, digest: Digest, compressor: str | None) -> str:
    text = f"{upload_id}\0{compressor or 'identity'}\0{digest}"
    return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()[:32]


class FileStore:
    """A CAS kept as files under `root` (see the module docstring for the guarantees)."""

    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        stale_temp_age: float = STALE_TEMP_AGE,
        upload_idle_timeout: float = UPLOAD_IDLE_TIMEOUT,
        max_idle_uploads: int = MAX_IDLE_UPLOADS,
    ) -> None:
        """Create the directories and remove temporary files older than `stale_temp_age`.

        `fsync=False` skips the fsync of blob files and directories: faster, but a
        machine crash may leave a truncated blob behind. Meant for tests only.
        `upload_idle_timeout` and `max_idle_uploads` bound the unfinished resumable
        uploads kept (see `open_upload`).
        Construction does blocking I/O; build the store before serving.
        """
        self.root = Path(root)
        self.blob_dir = self.root / HASH_NAME
        self.tmp_dir = self.root / "tmp"
        self._fsync = fsync
        self._upload_idle_timeout = upload_idle_timeout
        self._max_idle_uploads = max_idle_uploads
        self._uploads: dict[str, UploadSession] = {}
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

    async def put_many(
        self, items: list[tuple[Digest, bytes] | tuple[Digest, bytes, str | None]]
    ) -> list[Exception | None]:
        """Store several small blobs in one thread hop (for BatchUpdateBlobs).

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
                    if len(item) > 2 and item[2] is not None:
                        data = _decompress(digest, data, item[2])
                    self._put_checked(digest, data)
                except Exception as exc:  # noqa: BLE001 - each item gets its own status
                    results.append(exc)
                else:
                    results.append(None)
            return results

        if not items:
            return []
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
                _touch_if_stale(f, st)
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"blob {digest} not found") from None

    async def get(self, digest: Digest) -> bytes:
        """The blob's whole content; `NotFound` if absent. Reads it all into memory."""
        if digest == EMPTY:
            return b""
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
            cctx = _compressor_for(compressor)
            results: list[bytes | Exception] = []
            for digest in digests:
                try:
                    data = self._read_whole(digest)
                except Exception as exc:  # noqa: BLE001 - each item gets its own status
                    results.append(exc)
                else:
                    results.append(cctx.compress(data) if cctx is not None else data)
            return results

        return await asyncio.to_thread(run)

    async def read_compressed(
        self,
        digest: Digest,
        offset: int = 0,
        compressor: str = ZSTD,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> AsyncIterator[bytes]:
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
        cctx = _compressor_for(compressor)
        cobj = cctx.compressobj(size=max(digest.size_bytes - max(offset, 0), 0))
        source = self.read_chunks(digest, offset, 0, chunk_size=_COPY_CHUNK)
        async with contextlib.aclosing(source):
            async for data in source:
                out = await asyncio.to_thread(cobj.compress, data)
                for piece in _pieces(out, chunk_size):
                    yield piece
        for piece in _pieces(cobj.flush(), chunk_size):
            yield piece

    # ------------------------------------------------------ resumable uploads

    def _upload_path(self, key: str) -> Path:
        return self.tmp_dir / f"upload-{key}"

    async def open_upload(
        self, upload_id: str, digest: Digest, compressor: str | None = None
    ) -> UploadSession:
        """Start or continue the resumable upload `upload_id` of `digest` (ByteStream Write).

        An upload is named by (`upload_id`, `digest`, `compressor`). Its data is
        verified as it arrives and kept (uncompressed) in `tmp/upload-<key>`; when a
        stream breaks, the session stays here, and a later stream with the same names
        continues it from `resume_offset()`. The file alone is enough to resume, so
        uploads also survive a restart. Unfinished uploads idle for
        `upload_idle_timeout`, or beyond `max_idle_uploads`, are dropped.

        If the blob is stored already, the session returned is `complete` at once.
        Raises `InvalidArgument` for an empty `upload_id` or an unsupported compressor.
        """
        compressor = check_compressor(compressor)
        if not upload_id:
            raise InvalidArgument(f"blob {digest}: the upload id is empty")
        key = _upload_key(upload_id, digest, compressor)
        await self._drop_idle_uploads()
        session = self._uploads.get(key)

        def present() -> bool:
            if not self._present(digest, touch=True):
                return False
            if session is None:
                _unlink_quiet(self._upload_path(key))  # left by an earlier process
            return True

        if await asyncio.to_thread(present):
            if session is not None and not session.busy:
                await session.abort()
            return UploadSession(self, key, digest, compressor, complete=True)
        if session is not None and session.usable:
            session.last_used = time.monotonic()
            return session
        session = UploadSession(self, key, digest, compressor)
        await asyncio.to_thread(session._restore_blocking)
        existing = self._uploads.get(key)
        if existing is not None and existing.usable:
            return existing  # a concurrent call got there first
        self._uploads[key] = session
        return session

    async def upload_status(
        self, upload_id: str, digest: Digest, compressor: str | None = None
    ) -> tuple[int, bool]:
        """(committed_size, complete) of an upload, as ByteStream QueryWriteStatus reports it.

        committed_size is where a new Write stream continues the upload (see
        `UploadSession.resume_offset`); an unknown upload has committed 0 bytes. Complete
        (with committed_size = the blob's size) once the blob is stored, by any upload.
        """
        compressor = check_compressor(compressor)
        if await self.has(digest):
            return digest.size_bytes, True
        key = _upload_key(upload_id, digest, compressor)
        session = self._uploads.get(key)
        if session is not None and session.usable:
            offset = await session.resume_offset()
            return (digest.size_bytes, True) if session.complete else (offset, False)

        def on_disk() -> int:
            try:
                size = os.stat(self._upload_path(key)).st_size
            except (FileNotFoundError, NotADirectoryError):
                return 0
            return size if size <= digest.size_bytes else 0

        return await asyncio.to_thread(on_disk), False

    def _forget_upload(self, session: UploadSession) -> None:
        if self._uploads.get(session.key) is session:
            del self._uploads[session.key]

    async def _drop_idle_uploads(self) -> None:
        if not self._uploads:
            return
        now = time.monotonic()
        idle = sorted((s for s in self._uploads.values() if not s.busy), key=lambda s: s.last_used)
        drop = [s for s in idle if now - s.last_used > self._upload_idle_timeout]
        excess = len(self._uploads) - len(drop) - self._max_idle_uploads
        if excess > 0:
            drop += [s for s in idle if s not in drop][:excess]
        for session in drop:
            await session.abort()

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
                st = os.fstat(f.fileno())
                if st.st_size != size:
                    raise NotFound(f"blob {digest} not found (stored file has the wrong size)")
                if offset > size:
                    raise out_of_range()
                _touch_if_stale(f, st)
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


class UploadSession:
    """One resumable upload of a blob, from `FileStore.open_upload`.

    The upload arrives in one or more streams (ByteStream Write calls); each call of
    `write` carries one message with its `write_offset`, as REAPI defines it:

    * Uncompressed: offsets count the blob's bytes; a stream starts at
      `resume_offset()` and each message at the end of the previous one.
    * Compressed: a stream starts at `resume_offset()` in *uncompressed* bytes and
      sends the rest of the blob as a new compressed stream; later messages of that
      stream are at the first offset plus the compressed bytes sent since. (This is
      what REAPI says and what Bazel does when it resumes.)

    Data is buffered up to 1 MiB, then decompressed if need be, hashed and appended to
    the upload's file in a worker thread. That work runs to the end even if the stream
    that sent the data is cancelled, and the next call waits for it, so a broken
    stream always leaves a consistent state to resume from.
    """

    def __init__(
        self,
        store: FileStore,
        key: str,
        digest: Digest,
        compressor: str | None,
        *,
        complete: bool = False,
    ) -> None:
        self.key = key
        self.digest = digest
        self.compressor = compressor
        self.path = store._upload_path(key)
        self.last_used = time.monotonic()
        self._store = store
        self._next_offset = 0  # the write_offset the next message must carry
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._hasher = new_hasher()
        self._written = 0  # uncompressed bytes hashed and in the file
        self._decoder = _ZstdDecoder(digest) if compressor == ZSTD and not complete else None
        self._state = "complete" if complete else "open"  # open -> complete | failed
        self._already_stored = complete
        self._error: BaseException | None = None
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Future | None = None

    @property
    def next_offset(self) -> int:
        """The write_offset the next message of the current stream must carry."""
        return self._next_offset

    @property
    def complete(self) -> bool:
        """True once the blob is stored, by this upload or another."""
        return self._state == "complete"

    @property
    def usable(self) -> bool:
        return self._state == "open"

    @property
    def busy(self) -> bool:
        """True while a call is running or its thread work is unfinished."""
        return self._lock.locked() or (self._inflight is not None and not self._inflight.done())

    @property
    def result_size(self) -> int:
        """What WriteResponse.committed_size reports once the upload is complete.

        The blob's size for an uncompressed upload. For a compressed one the end offset
        of the stream (its first write_offset plus the compressed bytes it sent), or -1
        if it finished early because the blob was already stored (the REAPI rules).
        """
        if self.compressor is None:
            return self.digest.size_bytes
        return -1 if self._already_stored else self._next_offset

    async def resume_offset(self) -> int:
        """Where a new stream continues this upload (QueryWriteStatus.committed_size).

        Uncompressed: every byte received. Compressed: the uncompressed bytes decoded
        from what was received; the tail of an unfinished compressed block is dropped
        and sent again by the client in its new stream.
        """
        async with self._lock:
            await self._settle()
            if self._state == "complete":
                return self.digest.size_bytes
            if self._state != "open":
                return 0
            if self.compressor is None:
                return self._next_offset
            if self._pending:
                with contextlib.suppress(InvalidArgument):
                    await self._run(self._apply_blocking, self._take_pending())
            if self._state == "complete":
                return self.digest.size_bytes
            return self._written if self._state == "open" else 0

    async def write(
        self, offset: int, data: bytes, *, first: bool = False, finish: bool = False
    ) -> bool:
        """Take one message of a stream (`first`: the stream's first); True once complete.

        With `finish` the upload is verified and the blob published. Raises
        `InvalidArgument` for a wrong offset (the upload is kept as it was) and for data
        that does not match the digest (the upload is dropped). Returns True early,
        without taking the data, if the blob got stored meanwhile.
        """
        async with self._lock:
            await self._settle()
            self.last_used = time.monotonic()
            if self._state == "complete":
                return True
            self._check_open()
            if first and self.compressor is not None:
                await self._start_compressed_stream()
                if self._state == "complete":
                    return True
            if offset != self._next_offset:
                raise self._offset_error(offset, first)
            if data:
                end = self._next_offset + len(data)
                if self.compressor is None and end > self.digest.size_bytes:
                    error = _overflow_error(self.digest, end)
                    self._take_pending()
                    await self._run(self._discard_blocking, error)
                    raise error
                self._pending.append(bytes(data))
                self._pending_size += len(data)
                self._next_offset = end
            if finish:
                await self._run(self._finish_blocking, self._take_pending())
                return True
            if self._pending_size >= _WRITE_BUFFER:
                await self._run(self._apply_blocking, self._take_pending())
            return self._state == "complete"

    async def abort(self) -> None:
        """Drop the upload and its data. Idempotent; a no-op once complete."""
        async with self._lock:
            await self._settle()
            if self._state == "open":
                self._take_pending()
                await self._run(self._discard_blocking, InvalidArgument("upload was aborted"))

    # Loop side.

    async def _start_compressed_stream(self) -> None:
        """Decode what the previous stream sent, then expect a new compressed stream."""
        if self._pending:
            await self._run(self._apply_blocking, self._take_pending())
        self._decoder = _ZstdDecoder(self.digest)
        self._next_offset = self._written

    def _offset_error(self, offset: int, first: bool) -> InvalidArgument:
        if first or self.compressor is None:
            return InvalidArgument(
                f"blob {self.digest}: write_offset {offset} does not match the "
                f"{self._next_offset} bytes committed so far (resume at {self._next_offset})"
            )
        return InvalidArgument(
            f"blob {self.digest}: write_offset {offset} does not match {self._next_offset}, "
            "the stream's first write_offset plus the compressed bytes sent since"
        )

    def _check_open(self) -> None:
        if self._state == "failed":
            raise InvalidArgument(f"blob {self.digest}: this upload failed earlier: {self._error}")

    def _take_pending(self) -> list[bytes]:
        pending = self._pending
        self._pending = []
        self._pending_size = 0
        return pending

    async def _settle(self) -> None:
        """Wait for thread work started by an earlier (maybe cancelled) call."""
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            await asyncio.wait([inflight])

    async def _run(self, fn, *args):
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._inflight = future
        future.add_done_callback(self._thread_done)
        # Shielded: cancelling the caller must not abandon a half-applied chunk.
        return await asyncio.shield(future)

    def _thread_done(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self._state = "failed"
            self._error = InvalidArgument("upload was interrupted")
        else:
            future.exception()  # retrieved here: the caller may have been cancelled
        if self._state != "open":
            self._store._forget_upload(self)

    # Thread side. Only one runs at a time (see _settle); each sets the final state itself.

    def _restore_blocking(self) -> None:
        """Pick up the file of an upload left by an earlier session or process."""
        try:
            size = os.stat(self.path).st_size
        except (FileNotFoundError, NotADirectoryError):
            return
        if size > self.digest.size_bytes:
            _unlink_quiet(self.path)
            return
        hasher = new_hasher()
        received = 0
        with open(self.path, "rb") as f:
            for chunk in _read_file_chunks(f):
                hasher.update(chunk)
                received += len(chunk)
        self._hasher = hasher
        self._written = self._next_offset = received

    def _consume(self, f: BinaryIO, chunks: list[bytes]) -> None:
        size = self.digest.size_bytes
        compressed = self.compressor is not None

        def out(piece) -> None:
            received = self._written + len(piece)
            if received > size:
                raise (_decompressed_overflow if compressed else _overflow_error)(
                    self.digest, received
                )
            self._hasher.update(piece)
            f.write(piece)
            self._written = received

        for chunk in chunks:
            if self._decoder is not None:
                self._decoder.feed(chunk, out)
            else:
                out(chunk)

    def _failed(self, error: BaseException) -> None:
        _unlink_quiet(self.path)
        self._state = "failed"
        self._error = error

    def _apply_blocking(self, chunks: list[bytes]) -> None:
        try:
            with open(self.path, "ab") as f:
                self._consume(f, chunks)
            if self._store._present(self.digest, touch=True):
                # Another upload of the same blob finished first.
                _unlink_quiet(self.path)
                self._state = "complete"
                self._already_stored = True
        except BaseException as exc:
            self._failed(exc)
            raise

    def _finish_blocking(self, chunks: list[bytes]) -> None:
        store = self._store
        try:
            with open(self.path, "ab") as f:
                self._consume(f, chunks)
                if self.compressor is not None and self._written != self.digest.size_bytes:
                    raise _decompressed_size_error(self.digest, self._written)
                _verify(self.digest, self._written, self._hasher)
                present = self.digest.size_bytes == 0 or store._present(self.digest, touch=True)
                if not present:
                    store._finish_file(f)
            if present:
                _unlink_quiet(self.path)
            else:
                store._publish(self.path, store.path_of(self.digest))
            self._state = "complete"
        except BaseException as exc:
            self._failed(exc)
            raise

    def _discard_blocking(self, error: BaseException) -> None:
        self._failed(error)


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_IDLE_UPLOADS",
    "READ_TOUCH_AGE",
    "STALE_TEMP_AGE",
    "SUPPORTED_COMPRESSORS",
    "UPLOAD_IDLE_TIMEOUT",
    "ZSTD",
    "FileStore",
    "UploadSession",
    "check_compressor",
]
