"""Resumable uploads into the filesystem CAS (ByteStream Write and QueryWriteStatus).

An upload is named by (upload id, digest, compressor). Its data is verified as it arrives
and kept, uncompressed, in `tmp/upload-<key>`; when a stream breaks, the session stays in
`Uploads`, and a later stream with the same names continues it. The file alone is enough
to resume, so uploads also survive a restart. Idle unfinished uploads are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from typing import BinaryIO

from expbuild.cas.layout import (
    Layout,
    overflow_error,
    read_file_chunks,
    unlink_quiet,
    verify,
)
from expbuild.digest import Digest, new_hasher
from expbuild.errors import InvalidArgument
from expbuild.reapi.compression import ZSTD, ZstdDecoder, check_compressor

UPLOAD_IDLE_TIMEOUT = 900.0
"""Seconds after which an unfinished upload nobody writes to may be dropped."""
MAX_IDLE_UPLOADS = 256
"""Unfinished uploads kept for resumption beyond which the least recently used idle ones are dropped."""

# An upload keeps incoming chunks in memory until this many bytes are pending, then hands
# them to a thread in one go: a small blob streamed in many pieces costs one thread hop.
_WRITE_BUFFER = 1024 * 1024


def _upload_key(upload_id: str, digest: Digest, compressor: str | None) -> str:
    text = f"{upload_id}\0{compressor or 'identity'}\0{digest}"
    return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()[:32]


class Uploads:
    """The unfinished uploads of one store, by key."""

    def __init__(
        self,
        layout: Layout,
        *,
        idle_timeout: float = UPLOAD_IDLE_TIMEOUT,
        max_idle: int = MAX_IDLE_UPLOADS,
    ) -> None:
        self._layout = layout
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle
        self._sessions: dict[str, UploadSession] = {}

    async def open(
        self, upload_id: str, digest: Digest, compressor: str | None = None
    ) -> UploadSession:
        """Start or continue the resumable upload `upload_id` of `digest` (ByteStream Write).

        An upload is named by (`upload_id`, `digest`, `compressor`). Its data is
        verified as it arrives and kept (uncompressed) in `tmp/upload-<key>`; when a
        stream breaks, the session stays here, and a later stream with the same names
        continues it from `resume_offset()`. The file alone is enough to resume, so
        uploads also survive a restart. Unfinished uploads idle for
        `idle_timeout`, or beyond `max_idle`, are dropped.

        If the blob is stored already, the session returned is `complete` at once.
        Raises `InvalidArgument` for an empty `upload_id` or an unsupported compressor.
        """
        compressor = check_compressor(compressor)
        if not upload_id:
            raise InvalidArgument(f"blob {digest}: the upload id is empty")
        key = _upload_key(upload_id, digest, compressor)
        await self._drop_idle()
        session = self._sessions.get(key)

        def present() -> bool:
            if not self._layout.present(digest, touch=True):
                return False
            if session is None:
                unlink_quiet(self._layout.upload_path(key))  # left by an earlier process
            return True

        if await asyncio.to_thread(present):
            if session is not None and not session.busy:
                await session.abort()
            return UploadSession(self._layout, self, key, digest, compressor, complete=True)
        if session is not None and session.usable:
            session.last_used = time.monotonic()
            return session
        session = UploadSession(self._layout, self, key, digest, compressor)
        await asyncio.to_thread(session._restore_blocking)
        existing = self._sessions.get(key)
        if existing is not None and existing.usable:
            return existing  # a concurrent call got there first
        self._sessions[key] = session
        return session

    async def status(
        self, upload_id: str, digest: Digest, compressor: str | None = None
    ) -> tuple[int, bool]:
        """(committed_size, complete) of an upload, as ByteStream QueryWriteStatus reports it.

        committed_size is where a new Write stream continues the upload (see
        `UploadSession.resume_offset`); an unknown upload has committed 0 bytes. Complete
        (with committed_size = the blob's size) once the blob is stored, by any upload.
        """
        compressor = check_compressor(compressor)
        if await asyncio.to_thread(self._layout.present, digest):
            return digest.size_bytes, True
        key = _upload_key(upload_id, digest, compressor)
        session = self._sessions.get(key)
        if session is not None and session.usable:
            offset = await session.resume_offset()
            return (digest.size_bytes, True) if session.complete else (offset, False)

        def on_disk() -> int:
            try:
                size = os.stat(self._layout.upload_path(key)).st_size
            except (FileNotFoundError, NotADirectoryError):
                return 0
            return size if size <= digest.size_bytes else 0

        return await asyncio.to_thread(on_disk), False

    def forget(self, session: UploadSession) -> None:
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]

    async def _drop_idle(self) -> None:
        if not self._sessions:
            return
        now = time.monotonic()
        idle = sorted((s for s in self._sessions.values() if not s.busy), key=lambda s: s.last_used)
        drop = [s for s in idle if now - s.last_used > self._idle_timeout]
        excess = len(self._sessions) - len(drop) - self._max_idle
        if excess > 0:
            drop += [s for s in idle if s not in drop][:excess]
        for session in drop:
            await session.abort()


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
        layout: Layout,
        uploads: Uploads,
        key: str,
        digest: Digest,
        compressor: str | None,
        *,
        complete: bool = False,
    ) -> None:
        self.key = key
        self.digest = digest
        self.compressor = compressor
        self.path = layout.upload_path(key)
        self.last_used = time.monotonic()
        self._layout = layout
        self._uploads = uploads
        self._next_offset = 0  # the write_offset the next message must carry
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._hasher = new_hasher()
        self._written = 0  # uncompressed bytes hashed and in the file
        self._decoder = ZstdDecoder(digest) if compressor == ZSTD and not complete else None
        self._state = "complete" if complete else "open"  # open -> complete | failed
        self._already_stored = complete
        self._error: BaseException | None = None
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Future | None = None
        # A buffer handed to a thread by write() without waiting; the next write reports
        # its failure.
        self._deferred: asyncio.Future | None = None

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
            self._raise_deferred_failure()
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
                    error = overflow_error(self.digest, end)
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
                # Hashed and written in a thread while the next message arrives; the next
                # call (or abort) settles it first, and a failure fails the upload there.
                self._deferred = self._start(self._apply_blocking, self._take_pending())
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
        self._decoder = ZstdDecoder(self.digest, self._written)
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

    def _raise_deferred_failure(self) -> None:
        """Raise what the buffer written in the background failed with (a full disk's
        OSError, say), as the write that handed it over would have, rather than a later
        "failed earlier"; once, and only to the next write of the stream."""
        deferred, self._deferred = self._deferred, None
        error = deferred.exception() if deferred is not None and not deferred.cancelled() else None
        if error is not None:
            raise error

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

    def _start(self, fn, *args) -> asyncio.Future:
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._inflight = future
        future.add_done_callback(self._thread_done)
        return future

    async def _run(self, fn, *args):
        # Shielded: cancelling the caller must not abandon a half-applied chunk.
        return await asyncio.shield(self._start(fn, *args))

    def _thread_done(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self._state = "failed"
            self._error = InvalidArgument("upload was interrupted")
        else:
            future.exception()  # retrieved here: the caller may have been cancelled
        if self._state != "open":
            self._uploads.forget(self)

    # Thread side. Only one runs at a time (see _settle); each sets the final state itself.

    def _restore_blocking(self) -> None:
        """Pick up the file of an upload left by an earlier session or process."""
        try:
            size = os.stat(self.path).st_size
        except (FileNotFoundError, NotADirectoryError):
            return
        if size > self.digest.size_bytes:
            unlink_quiet(self.path)
            return
        hasher = new_hasher()
        received = 0
        with open(self.path, "rb") as f:
            for chunk in read_file_chunks(f):
                hasher.update(chunk)
                received += len(chunk)
        self._hasher = hasher
        self._written = self._next_offset = received

    def _consume(self, f: BinaryIO, chunks: list[bytes]) -> None:
        size = self.digest.size_bytes

        def out(piece) -> None:
            received = self._written + len(piece)
            if received > size:  # the decoder refuses compressed data that would overflow
                raise overflow_error(self.digest, received)
            self._hasher.update(piece)
            f.write(piece)
            self._written = received

        for chunk in chunks:
            if self._decoder is not None:
                self._decoder.feed(chunk, out)
            else:
                out(chunk)

    def _failed(self, error: BaseException) -> None:
        unlink_quiet(self.path)
        self._state = "failed"
        self._error = error

    def _apply_blocking(self, chunks: list[bytes]) -> None:
        try:
            with open(self.path, "ab") as f:
                self._consume(f, chunks)
            if self._layout.present(self.digest, touch=True):
                # Another upload of the same blob finished first.
                unlink_quiet(self.path)
                self._state = "complete"
                self._already_stored = True
        except BaseException as exc:
            self._failed(exc)
            raise

    def _finish_blocking(self, chunks: list[bytes]) -> None:
        layout = self._layout
        try:
            with open(self.path, "ab") as f:
                self._consume(f, chunks)
                if self._decoder is not None:
                    self._decoder.check_complete()
                verify(self.digest, self._written, self._hasher)
                present = self.digest.size_bytes == 0 or layout.present(self.digest, touch=True)
                if not present:
                    layout.finish_file(f)
            if present:
                unlink_quiet(self.path)
            else:
                layout.publish(self.path, layout.path_of(self.digest))
            self._state = "complete"
        except BaseException as exc:
            self._failed(exc)
            raise

    def _discard_blocking(self, error: BaseException) -> None:
        self._failed(error)


__all__ = ["MAX_IDLE_UPLOADS", "UPLOAD_IDLE_TIMEOUT", "UploadSession", "Uploads"]
