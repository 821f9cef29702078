"""FileStore against a real filesystem under tmp_path."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import pytest

from expbuild.cas.store import FileStore
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


async def test_streaming_write_many_chunks(store):
    data = os.urandom(3 * MiB + 17)
    d = digest_of(data)
    sizes = [1, 7, 4096, 65536, 100_000, 3]
    async with store.begin_write(d) as w:
        pos, i = 0, 0
        while pos < len(data):
            n = sizes[i % len(sizes)]
            await w.write(data[pos : pos + n])
            pos += n
            i += 1
            assert w.committed_size == min(pos, len(data))
        assert i > 100
    assert w.done
    assert await store.get(d) == data
    assert temp_files(store) == []


async def test_streaming_write_small_blob_and_commit_result(store):
    data = b"abc" * 100
    d = digest_of(data)
    w = store.begin_write(d)
    for i in range(0, len(data), 10):
        await w.write(bytearray(data[i : i + 10]))
    assert await w.commit() is True
    assert await w.commit() is True  # second commit is a no-op
    w2 = store.begin_write(d)
    await w2.write(data)
    assert await w2.commit() is False  # already present
    assert await store.get(d) == data
    assert temp_files(store) == []


async def test_put_file(store, tmp_path):
    data = os.urandom(2 * MiB + 5)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    d = digest_of(data)
    await store.put_file(d, src)
    assert await store.get(d) == data
    await store.put_file(d, src)  # present: still fine

    wrong = digest_of(data + b"x")
    with pytest.raises(InvalidArgument, match="received"):
        await store.put_file(wrong, src)
    with pytest.raises(InvalidArgument, match="hashes to"):
        await store.put_file(Digest(digest_of(b"other").hash, len(data)), src)
    with pytest.raises(FileNotFoundError):
        await store.put_file(d, tmp_path / "missing")
    assert temp_files(store) == []
    assert blob_files(store) == [store.path_of(d)]


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


async def test_streaming_wrong_hash_removes_temp(store):
    data = os.urandom(2 * MiB)  # large enough to reach the temp file before commit
    claimed = Digest(digest_of(b"nope").hash, len(data))
    w = store.begin_write(claimed)
    for i in range(0, len(data), 256 * 1024):
        await w.write(data[i : i + 256 * 1024])
    assert len(temp_files(store)) == 1
    with pytest.raises(InvalidArgument, match="hashes to"):
        await w.commit()
    assert temp_files(store) == []
    assert blob_files(store) == []
    with pytest.raises(InvalidArgument):
        await w.write(b"more")


async def test_streaming_too_short(store):
    data = os.urandom(MiB + 10)
    d = digest_of(data)
    with pytest.raises(InvalidArgument, match=f"received {MiB} bytes"):
        async with store.begin_write(d) as w:
            await w.write(data[:MiB])
    assert temp_files(store) == []
    assert blob_files(store) == []


async def test_streaming_too_long_fails_at_write(store):
    data = os.urandom(MiB + 10)
    d = digest_of(data)
    w = store.begin_write(d)
    await w.write(data)
    with pytest.raises(InvalidArgument, match="received at least"):
        await w.write(b"extra")
    assert w.done
    assert temp_files(store) == []
    assert blob_files(store) == []


# ------------------------------------------------------------------ concurrency


async def test_concurrent_puts_of_same_blob(store):
    data = os.urandom(MiB + 1)
    d = digest_of(data)
    await asyncio.gather(*(store.put(d, data) for _ in range(10)))
    assert await store.get(d) == data
    assert temp_files(store) == []


async def test_concurrent_streaming_writers_of_same_blob(store):
    data = os.urandom(3 * MiB)
    d = digest_of(data)

    async def upload() -> bool:
        async with store.begin_write(d) as w:
            for i in range(0, len(data), 100_000):
                await w.write(data[i : i + 100_000])
                await asyncio.sleep(0)
        return w.done

    assert await asyncio.gather(*(upload() for _ in range(10))) == [True] * 10
    assert await store.get(d) == data
    assert temp_files(store) == []
    assert blob_files(store) == [store.path_of(d)]


# ------------------------------------------------------------------ empty blob


async def test_empty_blob(store):
    assert await store.has(EMPTY)
    assert await store.get(EMPTY) == b""
    assert await collect(store, EMPTY) == []
    await store.put(EMPTY, b"")
    async with store.begin_write(EMPTY) as writer:  # nothing written: commits the empty blob
        assert writer.committed_size == 0
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


async def test_find_missing_touch_and_touch(store):
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
    await store.touch([b, missing, EMPTY])
    assert store.path_of(b).stat().st_mtime > old + 5000


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


async def test_abort_leaves_nothing(store):
    data = os.urandom(2 * MiB)
    d = digest_of(data)
    w = store.begin_write(d)
    await w.write(data[:MiB])
    await w.write(data[MiB : MiB + 10])
    assert len(temp_files(store)) == 1
    await w.abort()
    await w.abort()  # idempotent
    assert temp_files(store) == []
    assert blob_files(store) == []
    with pytest.raises(InvalidArgument):
        await w.write(b"x")
    with pytest.raises(InvalidArgument):
        await w.commit()


async def test_exception_in_context_aborts(store):
    data = os.urandom(2 * MiB)
    d = digest_of(data)
    with pytest.raises(RuntimeError, match="client went away"):
        async with store.begin_write(d) as w:
            await w.write(data[: MiB + 1])
            raise RuntimeError("client went away")
    assert temp_files(store) == []
    assert not await store.has(d)


async def test_cancelled_upload_leaves_nothing(store):
    data = os.urandom(4 * MiB)
    d = digest_of(data)
    started = asyncio.Event()

    async def upload():
        async with store.begin_write(d) as w:
            await w.write(data[: 2 * MiB])
            started.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(upload())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert temp_files(store) == []
    assert blob_files(store) == []


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
