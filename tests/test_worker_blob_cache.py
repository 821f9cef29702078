"""The worker's blob cache against a real server: its CAS over real gRPC, PostgreSQL
behind it, and a real WorkerAgent running real processes.

What the server sent is read from its own Prometheus counters (the server runs in this
process): `expbuild_cas_blobs_read` / `expbuild_cas_bytes_read` by method. The tests run
as root here, so file modes do not stop an action from writing through a hardlink into
the cache: what keeps the cache right is checking every entry before use.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import stat
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from google.rpc import code_pb2
from prometheus_client import REGISTRY

from expbuild.client.cas import CasClient
from expbuild.client.channel import open_channel
from expbuild.config import CacheSettings, ConfigError
from expbuild.digest import Digest, digest_of
from expbuild.server.app import ServerApp
from expbuild.worker.agent import WorkerAgent
from expbuild.worker.blob_cache import ENTRY_MTIME_NS, BlobCache, open_blob_cache
from tests.serving import running_server, server_settings
from tests.test_worker_agent import Client, client_of, running_agent, settings_for
from tests.test_worker_run_as import work_dir  # noqa: F401 (a fixture)
from tests.waiting import wait_until

MiB = 1024 * 1024
BATCH = "BatchReadBlobs"
STREAM = "ByteStream.Read"
TREE = "GetTree"


@pytest.fixture
async def server(database_url, tmp_path) -> AsyncIterator[ServerApp]:
    async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
        yield app


@pytest.fixture
async def client(server: ServerApp, tmp_path: Path) -> AsyncIterator[Client]:
    async with client_of(server, tmp_path) as client:
        yield client


@pytest.fixture
async def cas(server: ServerApp) -> AsyncIterator[CasClient]:
    async with open_channel(f"127.0.0.1:{server.port}") as channel:
        yield CasClient(channel)


class ServerReads:
    """What the in-process server's CAS has sent since this was made. Counts blobs, not
    bytes: the worker reads with zstd when the server offers it, so bytes on the wire
    are not the blobs' sizes."""

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> dict[tuple[str, str], float]:
        return {
            (what, method): REGISTRY.get_sample_value(
                f"expbuild_cas_{what}_read_total", {"method": method}
            )
            or 0.0
            for what in ("blobs", "bytes")
            for method in (BATCH, STREAM, TREE)
        }

    def blobs(self, method: str | None = None) -> int:
        return self._delta("blobs", method)

    def bytes(self, method: str | None = None) -> int:
        return self._delta("bytes", method)

    def _delta(self, what: str, method: str | None) -> int:
        now = self._now()
        methods = [method] if method else [BATCH, STREAM, TREE]
        return int(sum(now[what, m] - self._start[what, m] for m in methods))


@contextlib.asynccontextmanager
async def opened(root: Path, max_bytes: int, **options) -> AsyncIterator[BlobCache]:
    cache = await open_blob_cache(root, max_bytes, **options)
    try:
        yield cache
    finally:
        cache.close()


async def upload(cas: CasClient, *blobs: bytes) -> list[Digest]:
    await cas.upload({digest_of(b): b for b in blobs})
    return [digest_of(b) for b in blobs]


def links(path: Path) -> int:
    return os.stat(path).st_nlink


def make_writable_and_write(path: Path, data: bytes) -> None:
    """What a careless action (or a disk) might do to a cache entry."""
    os.chmod(path, 0o644)
    path.write_bytes(data)


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite the start of a file without truncating it (same inode, same size)."""
    with open(path, "r+b") as f:
        f.write(data)


def on_another_filesystem(path: Path) -> Path | None:
    """A fresh directory on a filesystem other than `path`'s (/dev/shm), if there is one."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(path).st_dev:
        return None
    return shm / f"expbuild-test-cache-{uuid.uuid4().hex}"


# -- through the worker ------------------------------------------------------------------


async def test_second_action_with_the_same_inputs_reads_nothing(server, client, work_dir):  # noqa: F811
    big = os.urandom(5 * MiB)  # beyond a batch: read by ByteStream
    files = {"src/a.txt": b"alpha\n", "src/b.txt": b"beta\n", "data/big.bin": big}
    # `stat -c %h`: the link count shows the input is a hardlink to the cache entry.
    script = "cat src/a.txt src/b.txt; sha256sum data/big.bin | cut -c1-64; stat -c %h src/a.txt"
    expected = b"alpha\nbeta\n" + hashlib.sha256(big).hexdigest().encode() + b"\n2\n"
    # Linked, not copied: the actions run as `nobody` (the default), who cannot write them.
    settings = settings_for(server.port, work_dir)
    settings = replace(settings, backend=replace(settings.backend, run_as="nobody"))
    async with running_agent(WorkerAgent(settings)):
        first_reads = ServerReads()
        first = await client.response(await client.submit(["sh", "-c", script], files=files))
        assert first.status.code == code_pb2.OK
        assert first_reads.blobs(STREAM) == 1
        assert first_reads.blobs(BATCH) >= 3  # the root and two Directory messages, a.txt, b.txt
        assert await client.read(first.result.stdout_digest) == expected

        second_reads = ServerReads()
        second = await client.response(
            await client.submit(["sh", "-c", script + "; echo again"], files=files)
        )
        assert second_reads.blobs() == 0 and second_reads.bytes() == 0
    assert second.status.code == code_pb2.OK
    assert await client.read(second.result.stdout_digest) == expected + b"again\n"

    # The default cache sits beside work_dir; entries are read-only and carry ENTRY_MTIME_NS.
    entry = settings.cache_dir / digest_of(big).hash[:2] / digest_of(big).hash
    st = os.stat(entry)
    assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_mtime_ns == ENTRY_MTIME_NS
    assert st.st_nlink == 1  # the action directories are gone
    assert list(work_dir.iterdir()) == []


async def test_concurrent_actions_download_a_shared_blob_once(server, client, tmp_path):
    shared = os.urandom(5 * MiB)
    digest = hashlib.sha256(shared).hexdigest()
    settings = settings_for(server.port, tmp_path / "work", max_concurrent_tasks=2)
    reads = ServerReads()
    async with running_agent(WorkerAgent(settings)):
        submitted = [
            await client.submit(
                ["sh", "-c", "sha256sum shared.bin | cut -c1-64; cat own.txt"],
                files={"shared.bin": shared, "own.txt": f"action {i}\n".encode()},
            )
            for i in range(2)
        ]
        responses = [await client.response(s) for s in submitted]
        assert reads.blobs(STREAM) == 1
    for i, response in enumerate(responses):
        assert response.status.code == code_pb2.OK
        stdout = await client.read(response.result.stdout_digest)
        assert stdout == f"{digest}\naction {i}\n".encode()


async def test_a_corrupt_entry_is_refetched(server, client, tmp_path):
    data = b"the real content\n" * 100
    script = "cat in.txt | sha256sum | cut -c1-64"
    expected = hashlib.sha256(data).hexdigest().encode() + b"\n"
    entry = tmp_path / "work-cache" / digest_of(data).hash[:2] / digest_of(data).hash
    async with running_agent(WorkerAgent(settings_for(server.port, tmp_path / "work"))):
        for i, damage in enumerate(
            [
                lambda: make_writable_and_write(entry, data[:-10]),  # truncated
                lambda: make_writable_and_write(entry, data.replace(b"real", b"fake")),  # same size
            ]
        ):
            first = await client.response(
                await client.submit(["sh", "-c", f"{script}; echo {i}a"], files={"in.txt": data})
            )
            assert first.status.code == code_pb2.OK
            damage()
            reads = ServerReads()
            second = await client.response(
                await client.submit(["sh", "-c", f"{script}; echo {i}b"], files={"in.txt": data})
            )
            # Only the damaged file comes again, not the cached Directory.
            assert reads.blobs() == 1
            assert second.status.code == code_pb2.OK
            assert await client.read(second.result.stdout_digest) == expected + f"{i}b\n".encode()
            assert entry.read_bytes() == data
            assert stat.S_IMODE(os.stat(entry).st_mode) == 0o444


async def test_an_action_writing_to_its_inputs_does_not_spoil_the_cache(server, client, tmp_path):
    appended, overwritten = b"appended to\n" * 50, b"overwritten in place\n" * 50
    files = {"appended.txt": appended, "overwritten.txt": overwritten}
    # Actions kept root (settings_for) get copies of cached inputs: they spoil only those.
    vandal = (
        "echo more >> appended.txt; "
        "printf XXXX | dd of=overwritten.txt conv=notrunc status=none; "
        "head -c 4 overwritten.txt"
    )
    check = "sha256sum appended.txt overwritten.txt | cut -c1-64"
    async with running_agent(WorkerAgent(settings_for(server.port, tmp_path / "work"))):
        vandalized = await client.response(await client.submit(["sh", "-c", vandal], files=files))
        assert vandalized.status.code == code_pb2.OK
        assert await client.read(vandalized.result.stdout_digest) == b"XXXX"
        reads = ServerReads()
        checked = await client.response(await client.submit(["sh", "-c", check], files=files))
        assert reads.blobs() == 0  # nothing to repair: the cache's entries were never reached
    assert checked.status.code == code_pb2.OK
    assert (
        await client.read(checked.result.stdout_digest)
        == (
            hashlib.sha256(appended).hexdigest()
            + "\n"
            + hashlib.sha256(overwritten).hexdigest()
            + "\n"
        ).encode()
    )


async def test_inputs_are_copied_when_the_cache_is_on_another_filesystem(server, client, tmp_path):
    cache_dir = on_another_filesystem(tmp_path)
    if cache_dir is None:
        pytest.skip("no second filesystem (/dev/shm) to put the cache on")
    data = b"copied, not linked\n" * 10
    # A copy is the action's own: one link, writable.
    script = "stat -c '%h %a' in.txt; echo changed >> in.txt; head -c 19 in.txt"
    settings = settings_for(
        server.port, tmp_path / "work", cache=CacheSettings(dir=str(cache_dir), max_size=MiB)
    )
    try:
        async with running_agent(WorkerAgent(settings)):
            responses = []
            for i in range(2):
                reads = ServerReads()
                responses.append(
                    await client.response(
                        await client.submit(
                            ["sh", "-c", f"{script}; echo {i}"], files={"in.txt": data}
                        )
                    )
                )
            assert reads.blobs() == 0  # the second action came from the cache all the same
        for i, response in enumerate(responses):
            assert response.status.code == code_pb2.OK
            stdout = await client.read(response.result.stdout_digest)
            assert stdout == f"1 644\ncopied, not linked\n{i}\n".encode()
        entry = cache_dir / digest_of(data).hash[:2] / digest_of(data).hash
        assert entry.read_bytes() == data
    finally:
        await asyncio.to_thread(_remove, cache_dir)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


async def test_max_size_zero_turns_the_cache_off(server, client, tmp_path):
    settings = settings_for(server.port, tmp_path / "work", cache=CacheSettings(max_size=0))
    async with running_agent(WorkerAgent(settings)):
        for _ in range(2):
            reads = ServerReads()
            response = await client.response(
                await client.submit(["cat", "in.txt"], files={"in.txt": b"no cache\n"})
            )
            assert response.status.code == code_pb2.OK
            assert reads.blobs() == 2  # the root Directory and the file, both times
    assert not (tmp_path / "work-cache").exists()


# -- the cache itself --------------------------------------------------------------------


async def test_places_links_read_only_entries_one_per_mode(cas, tmp_path):
    data = b"#!/bin/sh\necho hi\n"
    (digest,) = await upload(cas, data)
    out = tmp_path / "out"
    out.mkdir()
    reads = ServerReads()
    async with opened(tmp_path / "cache", MiB) as cache:
        missing = await cache.place_files(
            cas, {digest: [(out / "plain", False), (out / "tool", True), (out / "again", False)]}
        )
        assert missing == []
        assert reads.blobs() == 1  # one download for both modes
        plain, executable = cache.path_of(digest, False), cache.path_of(digest, True)
        assert plain.name == digest.hash and executable.name == f"{digest.hash}.x"
        assert stat.S_IMODE(os.stat(plain).st_mode) == 0o444
        assert stat.S_IMODE(os.stat(executable).st_mode) == 0o555
        assert os.stat(out / "plain").st_ino == os.stat(plain).st_ino
        assert os.stat(out / "again").st_ino == os.stat(plain).st_ino
        assert os.stat(out / "tool").st_ino == os.stat(executable).st_ino
        assert links(plain) == 3 and links(executable) == 2
        assert (out / "tool").read_bytes() == data
        assert cache.total_bytes == 2 * len(data)
        assert cache.stats.fetched_blobs == 2 and cache.stats.hits == 0


async def test_concurrent_callers_share_each_download(cas, tmp_path):
    big, small = os.urandom(6 * MiB), b"small and shared\n"
    big_digest, small_digest = await upload(cas, big, small)
    reads = ServerReads()
    async with opened(tmp_path / "cache", 64 * MiB) as cache:
        results = await asyncio.gather(
            *(
                cache.place_files(
                    cas,
                    {
                        big_digest: [(tmp_path / f"big-{i}", False)],
                        small_digest: [(tmp_path / f"small-{i}", False)],
                    },
                )
                for i in range(4)
            )
        )
    assert results == [[]] * 4
    assert reads.blobs(STREAM) == 1
    assert reads.blobs(BATCH) == 1
    for i in range(4):
        assert (tmp_path / f"big-{i}").read_bytes() == big
        assert (tmp_path / f"small-{i}").read_bytes() == small


async def test_a_cancelled_download_is_taken_over_by_the_next_caller(cas, tmp_path):
    big = os.urandom(64 * MiB)
    (digest,) = await upload(cas, big)
    async with opened(tmp_path / "cache", 256 * MiB) as cache:
        reads = ServerReads()
        first = asyncio.create_task(cache.place_files(cas, {digest: [(tmp_path / "a", False)]}))
        second = asyncio.create_task(cache.place_files(cas, {digest: [(tmp_path / "b", False)]}))
        # The first caller's download is under way (polled fast: it must still be).
        await wait_until(lambda: reads.bytes(STREAM), what="a download", interval=0.001)
        first.cancel()
        assert await second == []
        with pytest.raises(asyncio.CancelledError):
            await first
        assert (tmp_path / "b").read_bytes() == big
        assert cache.contains(digest, False)
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


async def test_evicts_least_recently_used_and_stays_within_bounds(cas, tmp_path):
    a, b, c, d = (bytes([i]) * 1000 for i in range(4))
    da, db, dc, dd = await upload(cas, a, b, c, d)
    out = tmp_path / "out"
    out.mkdir()

    async def place(*digests: Digest) -> None:
        assert (
            await cache.place_files(
                cas, {x: [(out / f"{x.hash[:8]}-{uuid.uuid4().hex}", False)] for x in digests}
            )
            == []
        )

    async with opened(tmp_path / "cache", 3000) as cache:
        await place(da)
        await place(db)
        await place(dc)
        assert cache.total_bytes == 3000
        await place(da)  # a is now the most recently used; b the least
        reads = ServerReads()
        await place(dd)
        assert reads.blobs() == 1
        assert [cache.contains(x, False) for x in (da, db, dc, dd)] == [True, False, True, True]
        assert not cache.path_of(db, False).exists()
        assert cache.total_bytes == 3000 and cache.stats.evictions == 1

        # One call needing more than fits: nothing it uses is evicted while it links
        # (each blob is read once), and the bound holds again once it is done.
        reads = ServerReads()
        await place(da, db, dc, dd)
        assert reads.blobs() == 1  # b only
        assert cache.total_bytes <= 3000

        # A blob bigger than the whole cache goes straight to its place.
        huge = os.urandom(5000)
        (dh,) = await upload(cas, huge)
        await place(dh)
        assert not cache.contains(dh, False) and cache.total_bytes <= 3000
    placed = sorted(p.read_bytes() for p in out.iterdir())
    assert placed == sorted([a, b, c, a, d, a, b, c, d, huge])


async def test_never_evicts_an_entry_another_call_is_placing(server, cas, tmp_path):
    a, small, b = b"a" * 1000, b"small" * 100, b"b" * 1500
    da, dsmall, db = await upload(cas, a, small, b)
    big = os.urandom(128 * MiB)
    (dbig,) = await upload(cas, big)
    async with open_channel(f"127.0.0.1:{server.port}") as channel:
        # One RPC at a time: while `blocker` streams `big`, a call through this client
        # holds its pin on `a` and waits to download `small`.
        narrow = CasClient(channel, concurrency=1)
        async with opened(tmp_path / "cache", 2000) as cache:
            assert await cache.place_files(cas, {da: [(tmp_path / "a0", False)]}) == []
            reads = ServerReads()
            blocker = asyncio.create_task(narrow.read_to_file(dbig, tmp_path / "big"))
            await wait_until(lambda: reads.bytes(STREAM), what="the download", interval=0.001)
            hits = cache.stats.hits
            placing = asyncio.create_task(
                cache.place_files(
                    narrow, {da: [(tmp_path / "a1", False)], dsmall: [(tmp_path / "s", False)]}
                )
            )
            # A hit is counted once `a` is checked and pinned (`small` then waits its turn).
            await wait_until(lambda: cache.stats.hits == hits + 1, what="`a` pinned")
            # Pushes the total over the bound with `a` the least recently used entry.
            assert await cache.place_files(cas, {db: [(tmp_path / "b", False)]}) == []
            assert not blocker.done(), "the download meant to hold the slot ended too soon"
            assert cache.contains(da, False) and not cache.contains(db, False)
            assert await placing == []
            await blocker
            assert reads.blobs(BATCH) == 2  # b and small; a was not fetched again
            assert (tmp_path / "a1").read_bytes() == a and (tmp_path / "s").read_bytes() == small
            assert cache.total_bytes <= 2000


async def test_detects_modification_through_a_hardlink(cas, tmp_path):
    data = b"precious input\n" * 20
    (digest,) = await upload(cas, data)
    async with opened(tmp_path / "cache", MiB) as cache:
        await cache.place_files(cas, {digest: [(tmp_path / "first", False)]})
        # Root ignores the 0444 mode: writing through the link changes the entry.
        write_in_place(tmp_path / "first", b"PRECIOUS")
        assert cache.path_of(digest, False).read_bytes() != data
        reads = ServerReads()
        await cache.place_files(cas, {digest: [(tmp_path / "second", False)]})
        assert reads.blobs() == 1
        assert (tmp_path / "second").read_bytes() == data
        assert cache.stats.corrupt == 1
        # The vandalized file was replaced, not repaired: the first link keeps its bytes.
        assert os.stat(tmp_path / "second").st_ino != os.stat(tmp_path / "first").st_ino


async def test_a_touched_but_intact_entry_is_kept(cas, tmp_path):
    data = b"only touched\n"
    (digest,) = await upload(cas, data)
    async with opened(tmp_path / "cache", MiB) as cache:
        await cache.place_files(cas, {digest: [(tmp_path / "first", False)]})
        entry = cache.path_of(digest, False)
        os.chmod(tmp_path / "first", 0o644)  # through the link: the entry's mode changes
        os.utime(tmp_path / "first")
        reads = ServerReads()
        await cache.place_files(cas, {digest: [(tmp_path / "second", False)]})
        assert reads.blobs() == 0  # re-hashed, found intact, sealed again
        assert cache.stats.corrupt == 0
        st = os.stat(entry)
        assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_mtime_ns == ENTRY_MTIME_NS
        assert os.stat(tmp_path / "second").st_ino == st.st_ino


async def test_verify_fraction_catches_what_a_stat_cannot(cas, tmp_path):
    data = b"silently rotten\n" * 8
    (digest,) = await upload(cas, data)
    for fraction, reads_expected in ((0.0, 0), (1.0, 1)):
        root = tmp_path / f"cache-{fraction}"
        async with opened(root, MiB, verify_fraction=fraction) as cache:
            await cache.place_files(cas, {digest: [(root.with_name(f"{root.name}-a"), False)]})
            entry = cache.path_of(digest, False)
            # Same size, and mode and mtime put back: only hashing can tell.
            make_writable_and_write(entry, data.replace(b"rotten", b"ROTTEN"))
            os.chmod(entry, 0o444)
            os.utime(entry, ns=(ENTRY_MTIME_NS, ENTRY_MTIME_NS))
            reads = ServerReads()
            target = root.with_name(f"{root.name}-b")
            await cache.place_files(cas, {digest: [(target, False)]})
            assert reads.blobs() == reads_expected
            assert (target.read_bytes() == data) is bool(reads_expected)


async def test_copy_fallback_verifies_what_it_copies(cas, tmp_path):
    cache_dir = on_another_filesystem(tmp_path)
    if cache_dir is None:
        pytest.skip("no second filesystem (/dev/shm) to put the cache on")
    data = b"crossing filesystems\n" * 8
    (digest,) = await upload(cas, data)
    try:
        async with opened(cache_dir, MiB) as cache:
            await cache.place_files(cas, {digest: [(tmp_path / "first", True)]})
            assert stat.S_IMODE(os.stat(tmp_path / "first").st_mode) == 0o755
            assert links(tmp_path / "first") == 1 and cache.stats.copies == 1
            # Rotten in a way a stat cannot see; the copy hashes what it copies.
            entry = cache.path_of(digest, True)
            make_writable_and_write(entry, data.replace(b"crossing", b"CROSSING"))
            os.chmod(entry, 0o555)
            os.utime(entry, ns=(ENTRY_MTIME_NS, ENTRY_MTIME_NS))
            reads = ServerReads()
            await cache.place_files(cas, {digest: [(tmp_path / "second", True)]})
            assert reads.blobs() == 1
            assert (tmp_path / "second").read_bytes() == data
            assert cache.stats.corrupt == 1 and entry.read_bytes() == data
    finally:
        await asyncio.to_thread(_remove, cache_dir)


async def test_missing_blobs_are_reported_and_leave_nothing_behind(cas, tmp_path):
    present, absent = b"present\n", b"never uploaded\n"
    (present_digest,) = await upload(cas, present)
    absent_digest = digest_of(absent)
    async with opened(tmp_path / "cache", MiB) as cache:
        missing = await cache.place_files(
            cas,
            {
                present_digest: [(tmp_path / "present", False)],
                absent_digest: [(tmp_path / "absent", False)],
            },
        )
        assert missing == [absent_digest]
        assert not cache.contains(absent_digest, False)
        found, not_found = await cache.read_available(cas, [present_digest, absent_digest])
        assert found == {present_digest: present} and not_found == [absent_digest]
    assert not (tmp_path / "absent").exists()
    assert [p for p in (tmp_path / "cache").rglob("*.tmp")] == []


async def test_reopening_finds_what_was_cached(cas, tmp_path):
    blobs = [os.urandom(1000) for _ in range(3)]
    digests = await upload(cas, *blobs)
    root = tmp_path / "cache"
    async with opened(root, MiB) as cache:
        await cache.place_files(
            cas, {d: [(tmp_path / f"a-{i}", False)] for i, d in enumerate(digests)}
        )
    leftover = root / digests[0].hash[:2] / f".{digests[0].hash}.deadbeef.tmp"
    leftover.write_bytes(b"half a download")
    # Truncated while no worker was watching: found out by size at first use.
    make_writable_and_write(root / digests[1].hash[:2] / digests[1].hash, blobs[1][:10])

    async with opened(root, 2500) as cache:
        assert not leftover.exists()
        # 3 entries (one short) fit: nothing evicted at start.
        assert all(cache.contains(d, False) for d in (digests[0], digests[2]))
        reads = ServerReads()
        assert (
            await cache.place_files(
                cas, {d: [(tmp_path / f"b-{i}", False)] for i, d in enumerate(digests)}
            )
            == []
        )
        assert reads.blobs() == 1
        assert [(tmp_path / f"b-{i}").read_bytes() for i in range(3)] == blobs
        assert cache.total_bytes <= 2500


async def test_a_cache_directory_is_used_by_one_process_only(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    # What another worker process holding the directory looks like to this one.
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="in use by another worker process"):
            await open_blob_cache(root, MiB)
    finally:
        os.close(fd)
    # Within one process, workers naming the same directory share one cache.
    async with opened(root, MiB) as first, opened(root, MiB) as second:
        assert first is second


def test_settings_parse_the_cache_keys(tmp_path):
    from expbuild.config import settings_from_mapping

    worker = settings_from_mapping(
        {"worker": {"backend": {"work_dir": "/srv/work"}, "cache": {"max_size": "2GiB"}}}
    ).worker
    assert worker.cache.max_size == 2 * 1024**3
    assert worker.cache_dir == Path("/srv/work-cache")
    worker = replace(worker, cache=replace(worker.cache, dir=str(tmp_path)))
    assert worker.cache_dir == tmp_path
    assert settings_from_mapping({"worker": {"cache": {"max_size": 0}}}).worker.cache.max_size == 0
    for bad, key in (
        ({"max_size": "lots"}, "worker.cache.max_size"),
        ({"verify_fraction": 1.5}, "worker.cache.verify_fraction"),
    ):
        with pytest.raises(ConfigError, match=key):
            settings_from_mapping({"worker": {"cache": bad}})
