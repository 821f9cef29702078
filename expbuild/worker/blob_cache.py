"""The worker's local blob cache: inputs are hardlinked from it instead of downloaded again.

Layout: `<root>/<hash[:2]>/<hash>` holds a blob as a plain file, `<hash>.x` as an
executable one (a hardlink shares its inode's mode, so the two need separate files).
Entries are read-only (0444 / 0555) with their mtime set to `ENTRY_MTIME_NS`; temporary
files are `.<hash>.<random>.tmp` beside them; `<root>/.lock` keeps other worker
processes out (the workers of one process share one `BlobCache`).

Actions get hardlinks, and file modes do not stop an action running as root from
writing through one into the cache. But any write sets the inode's mtime to now, so
before every use an entry's size, mtime, mode and inode are compared with what they
must be (one stat); on a difference the content is re-hashed, and the entry is restored
if it still matches its digest, else dropped and fetched again. `verify_fraction` of
the uses re-hash regardless (bit rot, a write that put the mtime back). Where a hardlink
cannot be made (another filesystem, EPERM, too many links) the entry is copied, and
hashed on the way. Two actions running at the same time do share the inode of an input
they both use: run actions as a user who cannot write to their inputs to rule out one
seeing the other's writes.

Bookkeeping is in memory, rebuilt by scanning the directory at start: entry sizes for
the `max_bytes` bound, least-recently-used order for eviction, pins on the entries a
call is using (never evicted meanwhile), and one future per entry being fetched,
repaired or deleted, so that concurrent actions needing one blob download it once.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import fcntl
import logging
import os
import random
import re
import stat
import time
import uuid
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from expbuild.aio import gather_or_cancel
from expbuild.client.cas import CasClient
from expbuild.client.tree import download_files
from expbuild.config import ConfigError
from expbuild.digest import Digest, digest_of, digest_of_file, new_hasher
from expbuild.worker import action_log

log = logging.getLogger(__name__)

# 2000-01-01T00:00:00Z: every entry has this mtime, so any write to one shows.
ENTRY_MTIME_NS = 946_684_800 * 1_000_000_000
_HASH_CHUNK = 1024 * 1024
# Rounds of placing files whose entry broke while being linked, before the rest are
# downloaded straight to their places.
_PLACE_ATTEMPTS = 3
# link(2) failures that mean "copy instead": another filesystem, a filesystem or
# policy (fs.protected_hardlinks) refusing, too many links to the inode.
_NO_HARDLINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK})
_HASH = re.compile(r"[0-9a-f]{64}")

# (digest hash, executable): one file in the cache.
_Key = tuple[str, bool]


def _entry_mode(executable: bool) -> int:
    return 0o555 if executable else 0o444


@dataclass
class CacheStats:
    """What a cache has done since it was opened (logged when it is closed)."""

    hits: int = 0  # entries found in the cache and used
    fetched_blobs: int = 0  # entries downloaded from the CAS
    fetched_bytes: int = 0
    copies: int = 0  # files copied out of the cache because a hardlink could not be made
    evictions: int = 0
    corrupt: int = 0  # entries found not to hash to their digest (or gone), dropped


@dataclass
class _Entry:
    size: int  # bytes on disk, counted against max_bytes
    inode: int
    pins: int = 0  # calls using the entry right now; it is not evicted meanwhile
    suspect: bool = False  # re-hash before the next use


class _Outcome(enum.Enum):
    READY = "ready"  # the entry is in the cache
    MISSING = "missing"  # the CAS lacks the blob
    RETRY = "retry"  # not fetched (failure, cancellation, eviction): try again


class _Placed(enum.Enum):
    LINKED = "linked"
    COPIED = "copied"
    BROKEN = "broken"  # the entry vanished or its content is wrong


class BlobCache:
    """A size-bounded, content-addressed store of blobs on the worker's disk.

    Open with `open_blob_cache`; the same instance serves every worker of the process
    that names the same root, and all of them must run on one event loop.
    """

    def __init__(self, root: Path, max_bytes: int, *, verify_fraction: float = 0.0):
        self.root = root
        self.max_bytes = max_bytes
        self.verify_fraction = verify_fraction
        self.stats = CacheStats()
        # Least recently used first.
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._flights: dict[_Key, asyncio.Future[_Outcome]] = {}
        self._total = 0
        self._lock_fd: int | None = None
        self._users = 0
        self._opening: asyncio.Future[None] | None = None

    @property
    def total_bytes(self) -> int:
        return self._total

    def path_of(self, digest: Digest, executable: bool) -> Path:
        return self._path((digest.hash, executable))

    def contains(self, digest: Digest, executable: bool) -> bool:
        entry = self._entries.get((digest.hash, executable))
        return entry is not None and entry.size == digest.size_bytes

    def source(self, cas: CasClient, *, link: bool = True) -> CachedSource:
        """What `materialize(..., source=)` takes to fetch through this cache; with
        `link=False`, files are copied out, for actions that could write the entries."""
        return CachedSource(self, cas, link)

    # -- opening and closing ------------------------------------------------------------

    async def _open(self) -> None:
        found = await asyncio.to_thread(self._lock_and_scan)
        for key, entry in found:
            self._entries[key] = entry
            self._total += entry.size
        log.info(
            "Worker blob cache %s: %d entries, %d of %d bytes",
            self.root,
            len(self._entries),
            self._total,
            self.max_bytes,
        )
        await self._evict()

    def _lock_and_scan(self) -> list[tuple[_Key, _Entry]]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"worker.cache.dir = {str(self.root)!r}: in use by another worker process; "
                "give each worker process its own cache directory"
            ) from None
        self._lock_fd = fd
        found: list[tuple[int, _Key, _Entry]] = []
        for folder in os.scandir(self.root):
            if len(folder.name) != 2 or not folder.is_dir(follow_symlinks=False):
                continue
            for item in os.scandir(folder.path):
                name = item.name
                if name.startswith(".") and name.endswith(".tmp"):
                    os.unlink(item.path)  # left by a worker that died mid-download
                    continue
                hash_, executable = (name[:-2], True) if name.endswith(".x") else (name, False)
                if not _HASH.fullmatch(hash_) or hash_[:2] != folder.name:
                    continue
                st = item.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    entry = _Entry(size=st.st_size, inode=st.st_ino)
                    found.append((st.st_atime_ns, (hash_, executable), entry))
        # Last access as the filesystem recorded it: the best LRU order there is at start.
        found.sort(key=lambda item: item[0])
        return [(key, entry) for _, key, entry in found]

    def close(self) -> None:
        """Stop using the cache; the last user of the process releases the lock."""
        self._users -= 1
        if self._users > 0:
            return
        _open_caches.pop(_registry_key(self.root), None)
        stats = self.stats
        log.info(
            "Blob cache %s closed: %d hit(s), %d blob(s) (%d bytes) fetched, %d copied, "
            "%d evicted, %d corrupt; %d bytes held",
            self.root,
            stats.hits,
            stats.fetched_blobs,
            stats.fetched_bytes,
            stats.copies,
            stats.evictions,
            stats.corrupt,
            self._total,
        )
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- what materialize calls ---------------------------------------------------------

    def _split(self, digests: Iterable[Digest]) -> tuple[list[Digest], list[Digest]]:
        """(digests to fetch through the cache, digests to fetch directly)."""
        digests = list(digests)
        sizes_per_hash = Counter(d.hash for d in digests)
        cached, direct = [], []
        for digest in digests:
            # The empty blob costs nothing to make; one bigger than the cache cannot stay;
            # one hash with two sizes (a lying digest) would share one entry.
            if 0 < digest.size_bytes <= self.max_bytes and sizes_per_hash[digest.hash] == 1:
                cached.append(digest)
            else:
                direct.append(digest)
        return cached, direct

    async def place_files(
        self,
        cas: CasClient,
        files: Mapping[Digest, Sequence[tuple[Path, bool]]],
        *,
        link: bool = True,
    ) -> list[Digest]:
        """Create every (path, executable) of each digest as a hardlink to (or a copy of)
        its cache entry, fetching the entries the cache lacks; a `tree.PlaceFiles`.

        Returns the digests the CAS lacks (all of them, as `download_files` does).
        """
        through_cache, directly = self._split(d for d, places in files.items() if places)
        direct = {d: files[d] for d in directly}
        cached = {d: files[d] for d in through_cache}
        missing_direct, missing_cached = await gather_or_cancel(
            [download_files(cas, direct), self._place_cached(cas, cached, link)]
        )
        return [*missing_cached, *missing_direct]

    async def _place_cached(
        self, cas: CasClient, files: Mapping[Digest, Sequence[tuple[Path, bool]]], link: bool
    ) -> list[Digest]:
        remaining = dict(files)
        for _ in range(_PLACE_ATTEMPTS):
            if not remaining:
                return []
            wanted = {(d.hash, x): d for d, places in remaining.items() for _, x in places}
            pinned, missing = await self._acquire(cas, wanted, stop_at_missing=True)
            try:
                if missing:
                    return missing
                jobs = [
                    (self._path((d.hash, x)), path, d, x)
                    for d, places in remaining.items()
                    for path, x in places
                ]
                placed = await asyncio.to_thread(_link_or_copy_all, jobs, link)
            finally:
                self._release(pinned)
            await self._evict()
            broken: set[_Key] = set()
            for (_, _, digest, executable), how in zip(jobs, placed, strict=True):
                if how is _Placed.COPIED:
                    self.stats.copies += 1
                elif how is _Placed.BROKEN:
                    broken.add((digest.hash, executable))
            for key in broken:
                if (entry := self._entries.get(key)) is not None:
                    entry.suspect = True
            remaining = {
                d: [(path, x) for path, x in places if (d.hash, x) in broken]
                for d, places in remaining.items()
                if any((d.hash, x) in broken for _, x in places)
            }
        if not remaining:
            return []
        log.warning(
            "%d blob(s) kept breaking in the worker cache %s; downloading them directly",
            len(remaining),
            self.root,
        )
        return await download_files(cas, remaining)

    async def read_available(
        self, cas: CasClient, digests: Iterable[Digest]
    ) -> tuple[dict[Digest, bytes], list[Digest]]:
        """Like `CasClient.read_available`, through the cache (for Directory messages)."""
        through_cache, direct = self._split(dict.fromkeys(digests))
        found, missing = await cas.read_available(direct)
        remaining = {(d.hash, False): d for d in through_cache}
        for _ in range(_PLACE_ATTEMPTS):
            if not remaining:
                break
            pinned, absent = await self._acquire(cas, remaining, stop_at_missing=False)
            try:
                contents = await asyncio.to_thread(
                    _read_verified, {key: (self._path(key), remaining[key]) for key in pinned}
                )
            finally:
                self._release(pinned)
            await self._evict()
            missing += absent
            for key, data in contents.items():
                if data is None:
                    if (entry := self._entries.get(key)) is not None:
                        entry.suspect = True
                else:
                    found[remaining.pop(key)] = data
            for digest in absent:
                remaining.pop((digest.hash, False), None)
        if remaining:
            more, absent = await cas.read_available(remaining.values())
            found.update(more)
            missing += absent
        return found, missing

    # -- entries ------------------------------------------------------------------------

    def _path(self, key: _Key) -> Path:
        hash_, executable = key
        return self.root / hash_[:2] / (f"{hash_}.x" if executable else hash_)

    def _release(self, pinned: Mapping[_Key, _Entry]) -> None:
        for entry in pinned.values():
            entry.pins -= 1

    async def _acquire(
        self, cas: CasClient, wanted: Mapping[_Key, Digest], *, stop_at_missing: bool
    ) -> tuple[dict[_Key, _Entry], list[Digest]]:
        """Pin a checked entry for each key, fetching the ones the cache lacks.

        Returns the pinned entries (the caller must `_release` them) and the digests
        the CAS lacks. With `stop_at_missing`, nothing more is fetched once a blob is
        found missing: the rest are checked with FindMissingBlobs and left unpinned.
        """
        loop = asyncio.get_running_loop()
        pinned: dict[_Key, _Entry] = {}
        missing: list[Digest] = []
        pending = dict(wanted)
        try:
            while pending:
                if missing and stop_at_missing:
                    unknown = [d for k, d in pending.items() if k not in self._entries]
                    missing += await cas.find_missing(unknown)
                    break
                waiting: dict[_Key, asyncio.Future[_Outcome]] = {}
                claimed: dict[_Key, Digest] = {}
                to_check: dict[_Key, Digest] = {}
                for key, digest in pending.items():
                    entry = self._entries.get(key)
                    if key in self._flights:
                        waiting[key] = self._flights[key]
                    elif (
                        entry is not None
                        and not entry.suspect
                        and random.random() >= self.verify_fraction
                    ):
                        entry.pins += 1
                        pinned[key] = entry
                        to_check[key] = digest
                    else:
                        self._flights[key] = loop.create_future()
                        claimed[key] = digest
                if to_check:
                    changed = await asyncio.to_thread(
                        _changed_entries,
                        {key: (self._path(key), pinned[key], to_check[key]) for key in to_check},
                    )
                    for key in to_check:
                        entry = pinned[key]
                        if self._entries.get(key) is not entry:
                            # Dropped as corrupt meanwhile: the next round fetches it.
                            entry.pins -= 1
                            del pinned[key]
                        elif key in changed:
                            entry.suspect = True  # the next round repairs it
                            entry.pins -= 1
                            del pinned[key]
                        else:
                            del pending[key]
                            self._entries.move_to_end(key)
                            self.stats.hits += 1
                            action_log.count_cache_hits(1)
                if claimed:
                    outcomes = await self._fill(cas, claimed)
                    for key, outcome in outcomes.items():
                        if outcome is _Outcome.READY:
                            entry = self._entries[key]
                            entry.pins += 1
                            pinned[key] = entry
                            del pending[key]
                        elif outcome is _Outcome.MISSING:
                            missing.append(pending.pop(key))
                if waiting and not (missing and stop_at_missing):
                    # asyncio.wait, not await: our cancellation must not cancel their fetch.
                    await asyncio.wait(waiting.values())
                    for key, flight in waiting.items():
                        if flight.result() is _Outcome.MISSING:
                            missing.append(pending.pop(key))
        except BaseException:
            self._release(pinned)
            raise
        return pinned, list(dict.fromkeys(missing))

    async def _fill(self, cas: CasClient, claimed: dict[_Key, Digest]) -> dict[_Key, _Outcome]:
        """Make the claimed entries good: keep a suspect one whose content still matches,
        download the rest. Ends every claimed flight, whatever happens."""
        outcomes = {key: _Outcome.RETRY for key in claimed}
        temps: list[Path] = []
        try:
            repairs = {k: (self._path(k), d) for k, d in claimed.items() if k in self._entries}
            if repairs:
                intact = await asyncio.to_thread(_restore_intact, repairs)
                for key in repairs:
                    entry = self._entries[key]
                    if key in intact:
                        entry.inode, entry.suspect = intact[key], False
                        outcomes[key] = _Outcome.READY
                    else:
                        log.warning(
                            "Worker cache entry %s does not match its digest; fetching it again",
                            self._path(key),
                        )
                        self.stats.corrupt += 1
                        del self._entries[key]
                        self._total -= entry.size
            fetch = {k: d for k, d in claimed.items() if outcomes[k] is _Outcome.RETRY}
            if not fetch:
                return outcomes
            downloads: dict[Digest, list[tuple[Path, bool]]] = defaultdict(list)
            temp_of: dict[_Key, Path] = {}
            for key, digest in fetch.items():
                final = self._path(key)
                temp = final.with_name(f".{key[0]}.{uuid.uuid4().hex[:12]}.tmp")
                temp_of[key] = temp
                temps.append(temp)
                downloads[digest].append((temp, key[1]))
            await asyncio.to_thread(_make_parents, temps)
            absent = set(await download_files(cas, downloads))
            fetched: dict[_Key, tuple[Path, Path, Digest]] = {}
            for key, digest in fetch.items():
                if digest in absent:
                    outcomes[key] = _Outcome.MISSING
                else:
                    fetched[key] = (temp_of[key], self._path(key), digest)
            done = await asyncio.to_thread(_finish_entries, fetched)
            for key, inode in done.items():
                size = fetch[key].size_bytes
                self._entries[key] = _Entry(size=size, inode=inode)
                self._total += size
                self.stats.fetched_blobs += 1
                self.stats.fetched_bytes += size
                action_log.count_cache_fetch(size)
                outcomes[key] = _Outcome.READY
            return outcomes
        finally:
            leftovers = [t for t in temps if t.exists()]
            if leftovers:
                await asyncio.to_thread(_unlink_all, leftovers)
            for key, outcome in outcomes.items():
                self._flights.pop(key).set_result(outcome)

    async def _evict(self) -> None:
        """Drop least recently used entries until the total fits in max_bytes; entries
        pinned or in flight stay (the total may exceed the bound while they are used)."""
        if self._total <= self.max_bytes:
            return
        loop = asyncio.get_running_loop()
        victims: list[_Key] = []
        for key, entry in list(self._entries.items()):
            if self._total <= self.max_bytes:
                break
            if entry.pins or key in self._flights:
                continue
            del self._entries[key]
            self._total -= entry.size
            # Held until the file is gone, so that nobody writes it anew meanwhile.
            self._flights[key] = loop.create_future()
            victims.append(key)
        if not victims:
            return
        self.stats.evictions += len(victims)
        log.debug("Worker cache: evicting %d entries", len(victims))
        unlink = asyncio.ensure_future(
            asyncio.to_thread(_unlink_all, [self._path(key) for key in victims])
        )

        def end_flights(_: asyncio.Future) -> None:
            for key in victims:
                self._flights.pop(key).set_result(_Outcome.RETRY)

        # Even if we are cancelled, the flights end only once the files are gone.
        unlink.add_done_callback(end_flights)
        await asyncio.shield(unlink)


@dataclass
class CachedSource:
    """A `tree.BlobSource` reading through a `BlobCache`."""

    cache: BlobCache
    cas: CasClient
    link: bool = True

    async def read_available(
        self, digests: Iterable[Digest]
    ) -> tuple[dict[Digest, bytes], list[Digest]]:
        return await self.cache.read_available(self.cas, digests)

    async def place_files(
        self, files: Mapping[Digest, Sequence[tuple[Path, bool]]]
    ) -> list[Digest]:
        return await self.cache.place_files(self.cas, files, link=self.link)


_open_caches: dict[str, BlobCache] = {}


def _registry_key(root: Path) -> str:
    return os.path.abspath(root)


async def open_blob_cache(root: Path, max_bytes: int, *, verify_fraction: float = 0.0) -> BlobCache:
    """The cache at `root`, shared by every caller in this process until each `close`s it.

    The first opener's `max_bytes` and `verify_fraction` apply. Raises `ConfigError` if
    another process uses `root`.
    """
    key = _registry_key(root)
    cache = _open_caches.get(key)
    if cache is None:
        cache = _open_caches[key] = BlobCache(root, max_bytes, verify_fraction=verify_fraction)
        cache._opening = asyncio.ensure_future(cache._open())
    cache._users += 1
    assert cache._opening is not None  # set when the cache was made, just above or earlier
    try:
        await asyncio.shield(cache._opening)
    except BaseException:
        cache.close()
        raise
    return cache


# -- file work, run in threads -----------------------------------------------------------


def _changed_entries(entries: Mapping[_Key, tuple[Path, _Entry, Digest]]) -> set[_Key]:
    """The entries whose file is not exactly as the cache left it (cheap: one stat)."""
    changed: set[_Key] = set()
    for key, (path, entry, digest) in entries.items():
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            changed.add(key)
            continue
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_size != digest.size_bytes
            or st.st_mtime_ns != ENTRY_MTIME_NS
            or stat.S_IMODE(st.st_mode) != _entry_mode(key[1])
            or st.st_ino != entry.inode
        ):
            changed.add(key)
    return changed


def _restore_intact(entries: Mapping[_Key, tuple[Path, Digest]]) -> dict[_Key, int]:
    """Re-hash suspect entries: those still matching get their mode and mtime back (their
    inode is returned); the others are deleted."""
    intact: dict[_Key, int] = {}
    for key, (path, digest) in entries.items():
        try:
            st = os.stat(path, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and digest_of_file(path) == digest:
                _seal(path, key[1])
                intact[key] = st.st_ino
                continue
            os.unlink(path)
        except FileNotFoundError:
            pass
    return intact


def _seal(path: Path, executable: bool) -> None:
    os.chmod(path, _entry_mode(executable))
    os.utime(path, ns=(time.time_ns(), ENTRY_MTIME_NS), follow_symlinks=False)


def _make_parents(paths: Iterable[Path]) -> None:
    for parent in {p.parent for p in paths}:
        parent.mkdir(parents=True, exist_ok=True)


def _finish_entries(files: Mapping[_Key, tuple[Path, Path, Digest]]) -> dict[_Key, int]:
    """Seal each downloaded temp file and rename it into place; returns their inodes.

    A temp file download_files did not write (it stopped at a missing blob) is skipped.
    """
    done: dict[_Key, int] = {}
    for key, (temp, final, digest) in files.items():
        try:
            st = os.stat(temp)
        except FileNotFoundError:
            continue
        if st.st_size != digest.size_bytes:
            continue
        _seal(temp, key[1])
        os.replace(temp, final)
        done[key] = st.st_ino
    return done


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _read_verified(entries: Mapping[_Key, tuple[Path, Digest]]) -> dict[_Key, bytes | None]:
    """Each entry's bytes, or None where the file is gone or does not hash to its digest."""
    result: dict[_Key, bytes | None] = {}
    for key, (path, digest) in entries.items():
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            result[key] = None
            continue
        result[key] = data if digest_of(data) == digest else None
    return result


def _link_or_copy_all(jobs: Sequence[tuple[Path, Path, Digest, bool]], link: bool) -> list[_Placed]:
    return [_link_or_copy(entry, path, digest, x, link) for entry, path, digest, x in jobs]


def _link_or_copy(
    entry: Path, path: Path, digest: Digest, executable: bool, link: bool = True
) -> _Placed:
    for _ in range(2 if link else 0):
        try:
            os.link(entry, path)
            return _Placed.LINKED
        except FileExistsError:
            os.unlink(path)  # materialize overwrites what is in the way
        except FileNotFoundError:
            if entry.exists():
                raise  # the destination's directory is missing: not the cache's doing
            return _Placed.BROKEN
        except OSError as exc:
            if exc.errno not in _NO_HARDLINK:
                raise
            break
    return _Placed.COPIED if _copy_verified(entry, path, digest, executable) else _Placed.BROKEN


def _copy_verified(entry: Path, path: Path, digest: Digest, executable: bool) -> bool:
    """Copy an entry, hashing it on the way; False (and no copy) if it does not match.

    The copy is the action's own, so it is writable like a plain download.
    """
    hasher = new_hasher()
    size = 0
    try:
        with open(entry, "rb") as source, open(path, "wb") as target:
            while chunk := source.read(_HASH_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
                target.write(chunk)
    except FileNotFoundError:
        if entry.exists():
            raise
        return False
    if size != digest.size_bytes or hasher.hexdigest() != digest.hash:
        os.unlink(path)
        return False
    os.chmod(path, 0o755 if executable else 0o644)
    return True
