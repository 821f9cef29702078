"""When blob files reach the disk, and what the store does after an OS crash.

`[cas] fsync` chooses:

* `always`: every blob file and its directory entry are fsynced before the write is
  acknowledged (an fsync per blob, even a 100-byte one).
* `batch` (the default): nothing is fsynced per blob; a background thread flushes the
  CAS filesystem (`syncfs`) every `BATCH_INTERVAL` seconds.
* `never`: the kernel writes blobs back when it likes.

The crash contract, for every mode:

* A kill -9 of the server loses nothing it acknowledged: the page cache outlives the
  process, and a blob appears only by an atomic rename of a complete, verified file.
* After an OS crash (power loss, kernel panic) with `batch` or `never`, a blob written
  since the last flush may be absent, short, or the right size with the wrong bytes.
  Every read checks the size (a short file is absent). For the rest, each replica keeps a
  marker file naming this boot and the time since which its writes may be unflushed;
  a store that starts and finds a marker of *this host* from *another boot* re-hashes
  every blob modified since that time and deletes those that do not match, before it
  serves anything. So neither an action cache entry (its completeness check sees the
  blob absent: a miss) nor a worker (told NOT_FOUND, the task fails cleanly) ever trusts
  a damaged blob. With `never` that window is the whole run since the last clean stop,
  so the scan after a crash can be long.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import socket
import threading
import time
import weakref
from pathlib import Path

from expbuild.digest import new_hasher

log = logging.getLogger(__name__)

FSYNC_MODES = ("always", "batch", "never")
BATCH_INTERVAL = 1.0
"""Seconds between two flushes of the CAS filesystem in `batch` mode."""
_HASH_CHUNK = 1024 * 1024


def boot_id() -> str:
    """This boot's identity (changes at every OS start); the start time where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"btime-{int(time.time() - time.monotonic())}"


def _syncfs_function():
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if hasattr(libc, "syncfs"):
            return libc.syncfs
    return None


_SYNCFS = _syncfs_function()


def flush_filesystem(path: Path) -> None:
    """Write back every dirty page of the filesystem holding `path` (all of them, where
    syncfs is missing)."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Persist a directory's entries; best effort where directories cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _file_matches(path: Path, expected_hash: str) -> bool:
    hasher = new_hasher()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest() == expected_hash


class Durability:
    """The unflushed-writes marker of one store, and the batch flusher.

    Markers live in `<root>/markers/<host>.<boot id>.<pid>`; their content is the time
    (epoch seconds) since which this process's writes may not be on disk.
    """

    def __init__(self, root: Path, blob_dir: Path, mode: str) -> None:
        if mode not in FSYNC_MODES:
            raise ValueError(f"fsync mode {mode!r} is not one of {', '.join(FSYNC_MODES)}")
        self.mode = mode
        self.root = root
        self.blob_dir = blob_dir
        self.marker_dir = root / "markers"
        self.host = socket.gethostname().replace(".", "_").replace("/", "_")
        self.boot = boot_id()
        self.marker: Path | None = None
        self.dirty = False  # a blob was published since the last flush
        # The flusher thread's flush and a clean close must not interleave: a flush that
        # outlived close would write the marker again (or find it gone mid-write).
        self._marker_lock = threading.Lock()

    @property
    def fsync_each_blob(self) -> bool:
        return self.mode == "always"

    # ------------------------------------------------------------------ start

    def start(self) -> int:
        """Recover from an earlier OS crash of this host, then mark this run's window.

        Returns how many damaged blobs were deleted. Blocking.
        """
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        removed = self._recover()
        if self.mode != "always":
            self.marker = self.marker_dir / f"{self.host}.{self.boot}.{os.getpid()}"
            self._write_marker(time.time())
        if self.mode == "batch":
            _FLUSHER.add(self)
        return removed

    def _crashed_markers(self) -> list[tuple[Path, float]]:
        found = []
        for path in self.marker_dir.iterdir():
            host, _, rest = path.name.partition(".")
            boot, _, _pid = rest.rpartition(".")
            if host != self.host or boot == self.boot:
                continue  # another host's (it checks for itself), or a kill -9 of this boot
            try:
                found.append((path, float(path.read_text().strip() or 0)))
            except (OSError, ValueError):
                found.append((path, 0.0))  # unreadable: suspect everything
        return found

    def _recover(self) -> int:
        crashed = self._crashed_markers()
        if not crashed:
            return 0
        since = min(t for _, t in crashed)
        log.warning(
            "The CAS at %s was written without fsync before an OS restart; checking every "
            "blob modified since %s",
            self.root,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)),
        )
        checked = removed = 0
        for shard in self.blob_dir.iterdir():
            if not shard.is_dir():
                continue
            with os.scandir(shard) as entries:
                for entry in entries:
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime < since:
                            continue
                        checked += 1
                        if not _file_matches(Path(entry.path), entry.name):
                            os.unlink(entry.path)
                            removed += 1
                    except FileNotFoundError:
                        continue
        for path, _ in crashed:
            path.unlink(missing_ok=True)
        fsync_directory(self.marker_dir)
        log.warning(
            "CAS check done: %d blob(s) hashed, %d damaged one(s) deleted", checked, removed
        )
        return removed

    # ---------------------------------------------------------------- running

    def _write_marker(self, since: float) -> None:
        assert self.marker is not None
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{since:.3f}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.marker)
        fsync_directory(self.marker_dir)

    def flush(self) -> None:
        """Make every blob written so far durable, and narrow the marker's window to now."""
        with self._marker_lock:
            started = time.time()
            self.dirty = False
            flush_filesystem(self.root)
            if self.marker is not None:
                self._write_marker(started)

    def close(self) -> None:
        """A clean stop: flush, and remove this run's marker."""
        _FLUSHER.discard(self)
        with self._marker_lock:
            if self.marker is not None:
                flush_filesystem(self.root)
                self.marker.unlink(missing_ok=True)
                fsync_directory(self.marker_dir)
                self.marker = None


class _Flusher:
    """One daemon thread per process flushes every `batch` store that was written to,
    every `BATCH_INTERVAL`; an idle store costs nothing, a dropped one is forgotten."""

    def __init__(self) -> None:
        self._stores: weakref.WeakSet[Durability] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, store: Durability) -> None:
        with self._lock:
            self._stores.add(store)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cas-flush", daemon=True)
                self._thread.start()

    def discard(self, store: Durability) -> None:
        with self._lock:
            self._stores.discard(store)

    def _run(self) -> None:
        while True:
            time.sleep(BATCH_INTERVAL)
            with self._lock:
                due = [store for store in self._stores if store.dirty]
            for store in due:
                try:
                    store.flush()
                except Exception:  # one store's failure must not stop flushing the others
                    log.exception("Flushing the CAS at %s failed; will retry", store.root)
                    store.dirty = True


_FLUSHER = _Flusher()


__all__ = ["BATCH_INTERVAL", "FSYNC_MODES", "Durability", "boot_id", "flush_filesystem"]
