"""Size-bounded LRU eviction of the filesystem CAS (`expbuild.cas.store.FileStore`).

The store records use in each blob file's mtime: a put of a blob already present,
FindMissingBlobs (`find_missing(touch=True)`), the action cache's completeness check
and reads (at most once per `READ_TOUCH_AGE`) bump it. `evict_to_size` scans the
blob files and, when they add up to more than the bound, deletes the least recently
used ones until the total is down to a low watermark, so a pass frees some headroom
instead of running again for every new blob.

Deleting a blob is always safe for correctness:

* Blobs are published by an atomic rename of a finished temp file, and temp files
  live in `tmp/`, which is never scanned: a blob being written cannot be evicted.
* Files modified within `min_age` are never deleted. A client uploads the inputs it
  was told are missing (or has them touched by FindMissingBlobs), then calls Execute;
  `min_age` keeps those blobs alive across that gap.
* An action cache entry whose outputs were evicted is not served: the completeness
  check (`expbuild.cas.action_results`) turns it into a miss and the action runs again.
* A reader that has the file open keeps reading it (unlinking does not affect open files).

This module knows no database. Replicas sharing one CAS directory must not evict at the
same time (both would count the same bytes and over-evict), so the server runs a pass only
while it holds `expbuild.db.locks.CAS_EVICTION_LOCK` (see `ServerApp.evict_once`). The
lock covers the scan too: a pass must see the store as it is while no other pass deletes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
import time
from dataclasses import dataclass

from expbuild.cas.store import FileStore

DEFAULT_LOW_WATERMARK = 0.9
DEFAULT_MIN_AGE = 300.0
"""Seconds since a blob's last use (mtime) before it may be evicted."""


@dataclass(frozen=True)
class EvictionReport:
    scanned: int  # blob files found
    total_bytes: int  # their total size before the pass deleted any
    removed: int  # blob files deleted
    removed_bytes: int
    seconds: float

    @property
    def remaining_bytes(self) -> int:
        """The store's size after the pass (as far as this pass knows)."""
        return self.total_bytes - self.removed_bytes


def _scan(blob_dir: str) -> list[tuple[float, int, str]]:
    """(mtime, size, path) of every blob file under the shard directories. Blocking."""
    found: list[tuple[float, int, str]] = []
    try:
        shards = [e.path for e in os.scandir(blob_dir) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return found
    for shard in shards:
        try:
            with os.scandir(shard) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed meanwhile
                    if stat.S_ISREG(st.st_mode):
                        found.append((st.st_mtime, st.st_size, entry.path))
        except FileNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class StoreUsage:
    blobs: int
    total_bytes: int


async def measure_usage(store: FileStore) -> StoreUsage:
    """Count the blobs and their bytes (a scan of the shard directories, off the loop)."""
    found = await asyncio.to_thread(_scan, str(store.blob_dir))
    return StoreUsage(len(found), sum(size for _mtime, size, _path in found))


def _evict_blocking(
    blob_dir: str, max_bytes: int, low_watermark: float, min_age: float, stop: threading.Event
) -> EvictionReport:
    started = time.monotonic()
    files = _scan(blob_dir)
    total = sum(size for _, size, _ in files)
    removed = removed_bytes = 0
    if total > max_bytes:
        target = int(max_bytes * low_watermark)
        cutoff = time.time() - min_age
        files.sort()  # oldest mtime (least recently used) first
        remaining = total
        for mtime, size, path in files:
            if remaining <= target or stop.is_set():
                break
            if mtime >= cutoff:
                break  # this and every later file was used too recently to evict
            try:
                # Used since the scan (touched by FindMissingBlobs, a read, a put): keep it.
                if os.stat(path, follow_symlinks=False).st_mtime > mtime:
                    continue
                os.unlink(path)
            except FileNotFoundError:
                remaining -= size  # gone already (another process), no longer counts
                continue
            remaining -= size
            removed += 1
            removed_bytes += size
    return EvictionReport(
        scanned=len(files),
        total_bytes=total,
        removed=removed,
        removed_bytes=removed_bytes,
        seconds=time.monotonic() - started,
    )


async def evict_to_size(
    store: FileStore,
    max_bytes: int,
    *,
    low_watermark: float = DEFAULT_LOW_WATERMARK,
    min_age: float = DEFAULT_MIN_AGE,
) -> EvictionReport:
    """One eviction pass over `store`; see the module docstring.

    If the blob files add up to more than `max_bytes`, delete the least recently used
    (oldest mtime) until the total is at most `low_watermark * max_bytes`, never
    deleting a file used within the last `min_age` seconds (so the total may stay above
    the bound). `max_bytes <= 0` means unbounded: nothing is scanned or deleted.
    The scan and deletions run in a worker thread. Cancelling stops the deletions and
    waits for the thread to finish the file at hand.
    """
    if not 0.0 < low_watermark <= 1.0:
        raise ValueError(f"low_watermark {low_watermark} must be in (0, 1]")
    if max_bytes <= 0:
        return EvictionReport(0, 0, 0, 0, 0.0)
    stop = threading.Event()
    job = asyncio.ensure_future(
        asyncio.to_thread(
            _evict_blocking, str(store.blob_dir), max_bytes, low_watermark, min_age, stop
        )
    )
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([job])
        with contextlib.suppress(BaseException):
            job.result()
        raise


__all__ = [
    "DEFAULT_LOW_WATERMARK",
    "DEFAULT_MIN_AGE",
    "EvictionReport",
    "evict_to_size",
]
