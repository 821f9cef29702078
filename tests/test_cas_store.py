"""FileStore against a real filesystem under tmp_path."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from expbuild.cas.store import INLINE_BYTES, INLINE_LOOKUPS, FileStore
from expbuild.digest import EMPTY, Digest, digest_of
from expbuild.errors import InvalidArgument, NotFound, OutOfRange

MiB = 1024 * 1024


@pytest.fixture
def store(tmp_path):
    return FileStore(tmp_path / "cas")


def temp_files(store: FileStore) -> list:
    return sorted(store.tmp_dir.iterdir())


def blob_files(store: FileStore) -> list:
    return sorted(p for p in store.blob_dir.rglob("*") if p.is_file())


async def collect(store: FileStore, digest: Digest, **kw) -> list[bytes]:
    return [chunk async for chunk in store.read_chunks(digest, **kw)]


# ------------------------------------------------------------------ round trips


async def test_round_trip_small(store):
    data = b"hello, world"
    d = digest_of(data)
    assert not await store.has(d)
    await store.put(d, data)
    assert await store.has(d)
    assert await store.get(d) == data
    path = store.path_of(d)
    assert path == store.root / "sha256" / d.hash[:2] / d.hash
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert temp_files(store) == []


async def test_round_trip_multi_mib(store):
    data = os.urandom(5 * MiB + 123)
    d = digest_of(data)
    await store.put(d, data)
    assert await store.get(d) == data
    chunks = await collect(store, d)
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= 64 * 1024 for c in chunks)


async def test_put_is_idempotent_and_does_not_rewrite(store):
    data = b"same content"
    d = digest_of(data)
    await store.put(d, data)
    path = store.path_of(d)
    old = time.time() - 1000
    os.utime(path, (old, old))
    inode = path.stat().st_ino
    await store.put(d, data)
    assert path.stat().st_ino == inode  # not replaced
    assert path.stat().st_mtime > old + 500  # but bumped for LRU
    assert temp_files(store) == []


async def test_upload_in_many_chunks(store):
    data = os.urandom(3 * MiB + 17)
    d = digest_of(data)
    upload = await store.open_upload("many", d)
    sizes = [1, 7, 4096, 65536, 100_000, 3]
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        end = min(pos + n, len(data))
        done = await upload.write(pos, data[pos:end], first=i == 0, finish=end == len(data))
        assert done == (end == len(data))
        pos, i = end, i + 1
    assert i > 100
    assert upload.complete and upload.result_size == len(data)
    assert await store.get(d) == data
    assert temp_files(store) == []
    # A second upload of a stored blob is complete at once and writes nothing.
    again = await store.open_upload("again", d)
    assert again.complete and temp_files(store) == []


# ------------------------------------------------------------------ verification


async def test_wrong_hash_refused(store):
    data = b"hello world!"
    claimed = Digest(digest_of(b"something else").hash, len(data))
    with pytest.raises(InvalidArgument) as info:
        await store.put(claimed, data)
    msg = str(info.value)
    assert str(claimed) in msg
    assert f"hashes to {digest_of(data).hash}" in msg
    assert temp_files(store) == []
    assert blob_files(store) == []
    assert not await store.has(claimed)


@pytest.mark.parametrize("delta", [-1, 1])
async def test_wrong_size_refused(store, delta):
    data = b"hello world!"  # 12 bytes
    d = digest_of(data)
    claimed = Digest(d.hash, len(data) - delta)
    with pytest.raises(InvalidArgument) as info:
        await store.put(claimed, data)
    assert str(claimed) in str(info.value)
    assert "received 12 bytes" in str(info.value)
    assert temp_files(store) == []
    assert blob_files(store) == []


async def test_wrong_content_refused_even_when_present(store):
    data = b"present"
    d = digest_of(data)
    await store.put(d, data)
    with pytest.raises(InvalidArgument, match="hashes to"):
        await store.put(d, b"PRESENT")
    assert await store.get(d) == data
    assert temp_files(store) == []


async def test_upload_with_wrong_hash_leaves_nothing(store):
    data = os.urandom(2 * MiB)  # large enough to reach the upload's file before finishing
    claimed = Digest(digest_of(b"nope").hash, len(data))
    upload = await store.open_upload("wrong", claimed)
    step = 256 * 1024
    for i in range(0, len(data) - step, step):
        await upload.write(i, data[i : i + step], first=i == 0)
    assert len(temp_files(store)) == 1
    with pytest.raises(InvalidArgument, match="hashes to"):
        await upload.write(len(data) - step, data[-step:], finish=True)
    assert temp_files(store) == []
    assert blob_files(store) == []
    with pytest.raises(InvalidArgument, match="failed earlier"):
        await upload.write(len(data), b"more")


async def test_upload_too_short(store):
    data = os.urandom(MiB + 10)
    d = digest_of(data)
    upload = await store.open_upload("short", d)
    with pytest.raises(InvalidArgument, match=f"received {MiB} bytes"):
        await upload.write(0, data[:MiB], first=True, finish=True)
    assert temp_files(store) == []
    assert blob_files(store) == []


async def test_upload_too_long_fails_at_write(store):
    data = os.urandom(MiB + 10)
    d = digest_of(data)
    upload = await store.open_upload("long", d)
    await upload.write(0, data, first=True)
    with pytest.raises(InvalidArgument, match="received at least"):
        await upload.write(len(data), b"extra")
    assert not upload.usable
    assert temp_files(store) == []
    assert blob_files(store) == []


# ------------------------------------------------------------------ concurrency


async def test_concurrent_puts_of_same_blob(store):
    data = os.urandom(MiB + 1)
    d = digest_of(data)
    await asyncio.gather(*(store.put(d, data) for _ in range(10)))
    assert await store.get(d) == data
    assert temp_files(store) == []


async def test_concurrent_uploads_of_same_blob(store):
    data = os.urandom(3 * MiB)
    d = digest_of(data)

    async def upload(n: int) -> bool:
        session = await store.open_upload(f"upload-{n}", d)
        step = 100_000
        for i in range(0, len(data), step):
            last = i + step >= len(data)
            if await session.write(i, data[i : i + step], first=i == 0, finish=last):
                return True  # stored, by this upload or another
            await asyncio.sleep(0)
        return False

    assert await asyncio.gather(*(upload(n) for n in range(10))) == [True] * 10
    assert await store.get(d) == data
    assert temp_files(store) == []
    assert blob_files(store) == [store.path_of(d)]


# ------------------------------------------------------------------ empty blob


async def test_empty_blob(store):
    assert await store.has(EMPTY)
    assert await store.get(EMPTY) == b""
    assert await collect(store, EMPTY) == []
    await store.put(EMPTY, b"")
    assert (await store.open_upload("empty", EMPTY)).complete  # nothing to send
    assert await store.find_missing([EMPTY, EMPTY]) == []
    assert blob_files(store) == []
    with pytest.raises(InvalidArgument):
        await store.put(EMPTY, b"x")
    with pytest.raises(OutOfRange):
        await collect(store, EMPTY, offset=1)
    # A zero-size digest that is not the empty blob's hash names nothing that can exist.
    bogus = Digest(digest_of(b"x").hash, 0)
    assert not await store.has(bogus)
    with pytest.raises(InvalidArgument, match="hashes to"):
        await store.put(bogus, b"")
    with pytest.raises(NotFound):
        await store.get(bogus)


# ------------------------------------------------------------------ presence


async def test_find_missing(store):
    a, b, c, e = (digest_of(x) for x in (b"a", b"bb", b"ccc", b"eeee"))
    await store.put(a, b"a")
    await store.put(c, b"ccc")
    # A stored file whose size disagrees with the digest counts as missing.
    wrong_size = Digest(c.hash, 99)
    result = await store.find_missing([e, a, b, e, EMPTY, wrong_size, c, b])
    assert result == [e, b, wrong_size]
    assert await store.find_missing([]) == []
    assert await store.find_missing(iter([a])) == []


async def test_find_missing_touch(store):
    a = digest_of(b"a")
    b = digest_of(b"b")
    await store.put(a, b"a")
    await store.put(b, b"b")
    old = time.time() - 10_000
    for d in (a, b):
        os.utime(store.path_of(d), (old, old))
    missing = digest_of(b"zzz")
    assert await store.find_missing([a, missing]) == [missing]
    assert store.path_of(a).stat().st_mtime == pytest.approx(old)
    assert await store.find_missing([a, missing], touch=True) == [missing]
    assert store.path_of(a).stat().st_mtime > old + 5000
    assert store.path_of(b).stat().st_mtime == pytest.approx(old)  # not asked about


# ------------------------------------------------------------------ ranged reads

DATA = bytes(range(256)) * 1000  # 256000 bytes


@pytest.mark.parametrize(
    ("offset", "limit", "chunk_size"),
    [
        (0, 0, 64 * 1024),
        (0, 0, 1000),
        (1, 0, 64 * 1024),
        (100, 50, 64 * 1024),
        (100, 100_000, 7777),
        (0, 1, 64 * 1024),
        (len(DATA) - 1, 0, 64 * 1024),
        (len(DATA) - 10, 100, 64 * 1024),  # limit past the end is clamped
        (65536, 65536, 65536),
        (0, len(DATA), 256),
    ],
)
async def test_read_chunks_ranges(store, offset, limit, chunk_size):
    d = digest_of(DATA)
    await store.put(d, DATA)
    chunks = await collect(store, d, offset=offset, limit=limit, chunk_size=chunk_size)
    expected = DATA[offset : offset + limit] if limit else DATA[offset:]
    assert b"".join(chunks) == expected
    assert all(0 < len(c) <= chunk_size for c in chunks)


async def test_read_chunks_errors(store):
    d = digest_of(DATA)
    await store.put(d, DATA)
    assert await collect(store, d, offset=len(DATA)) == []
    assert await collect(store, d, offset=len(DATA), limit=5) == []
    with pytest.raises(OutOfRange, match="past the end"):
        await collect(store, d, offset=len(DATA) + 1)
    with pytest.raises(OutOfRange, match="negative"):
        await collect(store, d, offset=-1)
    with pytest.raises(InvalidArgument, match="negative"):
        await collect(store, d, limit=-1)
    with pytest.raises(InvalidArgument):
        await collect(store, d, chunk_size=0)


async def test_read_chunks_missing_blob_fails_before_data(store):
    d = digest_of(b"not stored")
    it = store.read_chunks(d)
    with pytest.raises(NotFound, match=str(d)):
        await it.__anext__()
    with pytest.raises(NotFound, match=d.hash):
        await store.get(d)


async def test_read_chunks_stopped_early(store):
    d = digest_of(DATA)
    await store.put(d, DATA)
    it = store.read_chunks(d, chunk_size=1000)
    first = await it.__anext__()
    assert first == DATA[:1000]
    await it.aclose()  # closes the file; nothing to assert beyond not raising


# ------------------------------------------------------------------ abort and cleanup


async def test_aborted_upload_leaves_nothing(store):
    data = os.urandom(2 * MiB)
    d = digest_of(data)
    upload = await store.open_upload("abort", d)
    await upload.write(0, data[:MiB], first=True)
    await upload.write(MiB, data[MiB : MiB + 10])
    assert len(temp_files(store)) == 1
    await upload.abort()
    await upload.abort()  # idempotent
    assert temp_files(store) == []
    assert blob_files(store) == []
    with pytest.raises(InvalidArgument, match="aborted"):
        await upload.write(MiB + 10, b"x")
    # The same names start afresh.
    again = await store.open_upload("abort", d)
    assert await again.resume_offset() == 0


async def test_stale_temp_files_removed_at_construction(tmp_path):
    root = tmp_path / "cas"
    first = FileStore(root)
    old = first.tmp_dir / f"{'a' * 64}.{'0' * 32}"
    fresh = first.tmp_dir / f"{'b' * 64}.{'1' * 32}"
    old.write_bytes(b"left over by a crash")
    fresh.write_bytes(b"someone is writing this")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    FileStore(root)
    assert not old.exists()
    assert fresh.exists()


# ------------------------------------------------------------------ batches


async def test_put_many_mixed_results(store):
    good = b"good"
    present = b"present"
    await store.put(digest_of(present), present)
    items = [
        (digest_of(good), good),
        (Digest(digest_of(b"x").hash, 4), b"bad!"),  # wrong hash
        (Digest(digest_of(b"short").hash, 10), b"short"),  # wrong size
        (digest_of(present), present),
        (EMPTY, b""),
        (digest_of(good), good),  # duplicate in the batch
    ]
    results = await store.put_many(items)
    assert len(results) == len(items)
    assert results[0] is None
    assert isinstance(results[1], InvalidArgument) and "hashes to" in str(results[1])
    assert isinstance(results[2], InvalidArgument) and "received 5 bytes" in str(results[2])
    assert results[3:] == [None, None, None]
    assert await store.get(digest_of(good)) == good
    assert await store.put_many([]) == []
    assert temp_files(store) == []


async def test_small_lookups_and_reads_need_no_thread_but_large_ones_do(store):
    """A thread hop costs more than a stat or a small read: those run on the loop. With
    the loop's thread pool shut they still work, and anything larger is refused."""
    small, large = b"s" * 100, b"L" * (INLINE_BYTES + 1)
    await store.put_many([(digest_of(small), small), (digest_of(large), large)])
    absent = [digest_of(f"absent {n}".encode()) for n in range(INLINE_LOOKUPS + 1)]
    closed = ThreadPoolExecutor(max_workers=1)
    closed.shutdown()
    asyncio.get_running_loop().set_default_executor(closed)

    assert await store.get(digest_of(small)) == small
    found, missing = await store.get_many([digest_of(small), absent[0]])
    assert found == small and isinstance(missing, NotFound)
    assert await store.has(digest_of(large))
    few = absent[: INLINE_LOOKUPS - 1]
    assert await store.find_missing([digest_of(large), *few]) == few
    for large_work in (
        store.get(digest_of(large)),
        store.get_many([digest_of(small), digest_of(large)]),
        store.find_missing(absent),  # more digests than INLINE_LOOKUPS
    ):
        with pytest.raises(RuntimeError, match="after shutdown"):
            await large_work


async def test_small_writes_need_no_thread_unless_each_blob_is_fsynced(tmp_path):
    """Without an fsync per blob a small write is a few syscalls, cheaper than a thread
    hop: it runs on the loop. A large one, a compressed one, or any write that is fsynced
    takes a thread (the executor is shut here, so a hop fails)."""
    closed = ThreadPoolExecutor(max_workers=1)
    closed.shutdown()
    asyncio.get_running_loop().set_default_executor(closed)
    batched, synced = (
        FileStore(tmp_path / "b", fsync="batch"),
        FileStore(tmp_path / "s", fsync="always"),
    )
    small, other, large = b"s" * 100, b"o" * 200, b"L" * (INLINE_BYTES + 1)

    await batched.put(digest_of(small), small)
    assert await batched.put_many([(digest_of(other), other, "identity")]) == [None]
    assert await batched.get_many([digest_of(small), digest_of(other)]) == [small, other]
    for thread_work in (
        batched.put(digest_of(large), large),
        batched.put_many([(digest_of(small), small), (digest_of(large), large)]),
        batched.put_many([(digest_of(small), small, "zstd")]),
        synced.put(digest_of(small), small),
        synced.put_many([(digest_of(small), small)]),
    ):
        with pytest.raises(RuntimeError, match="after shutdown"):
            await thread_work
    assert not await synced.has(digest_of(small))
