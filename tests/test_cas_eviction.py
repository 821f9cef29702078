"""LRU eviction of the filesystem CAS: real files under tmp_path, real Postgres for the lock."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from dataclasses import replace
from datetime import timedelta

import grpc
import pytest

from expbuild.cas import eviction
from expbuild.cas.eviction import evict_to_size
from expbuild.cas.layout import READ_TOUCH_AGE
from expbuild.cas.store import FileStore
from expbuild.client.cas import CasClient
from expbuild.client.channel import open_channel
from expbuild.config import ConfigError, settings_from_mapping
from expbuild.db.locks import CAS_EVICTION_LOCK, try_advisory_lock
from expbuild.digest import Digest, digest_of
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.server import app as server_app
from expbuild.server.app import SCAN_PACE, pause_after
from tests.serving import running_server, server_settings
from tests.waiting import wait_until

HOUR = 3600.0


@pytest.fixture
def store(tmp_path):
    return FileStore(tmp_path / "cas", fsync=False)


def blob(i: int, size: int = 1000) -> tuple[Digest, bytes]:
    data = (f"blob-{i}-".encode() * size)[:size]
    return digest_of(data), data


def age(store: FileStore, digest: Digest, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    os.utime(store.path_of(digest), (t, t))


async def put_aged(store: FileStore, count: int, size: int = 1000) -> list[Digest]:
    """`count` blobs of `size` bytes; blob 0 is the least recently used."""
    digests = []
    for i in range(count):
        digest, data = blob(i, size)
        await store.put(digest, data)
        age(store, digest, 10 * HOUR - i * 60)
        digests.append(digest)
    return digests


def present(store: FileStore, digests: list[Digest]) -> list[bool]:
    return [store.path_of(d).exists() for d in digests]


def bound_by_hand(app, max_size: int) -> None:
    """Give a running server a CAS bound for `evict_once` calls. It started unbounded, so
    it runs no eviction pass of its own that could race the test's."""
    app.settings = replace(app.settings, cas=replace(app.settings.cas, max_size=max_size))


# ----------------------------------------------------------------- the pass itself


async def test_evicts_least_recently_used_first(store):
    digests = await put_aged(store, 10)
    # Make blob 0 the most recently used, as a FindMissingBlobs would.
    await store.find_missing([digests[0]], touch=True)
    age(store, digests[0], HOUR)  # still older than min_age, but the newest of all
    report = await evict_to_size(store, 6000, low_watermark=1.0)
    assert report.scanned == 10 and report.total_bytes == 10_000
    assert report.removed == 4 and report.removed_bytes == 4000
    assert report.remaining_bytes == 6000
    assert present(store, digests) == [True] + [False] * 4 + [True] * 5


async def test_low_watermark_is_respected(store):
    digests = await put_aged(store, 10)
    report = await evict_to_size(store, 9000)  # low watermark 0.9: down to 8100 bytes
    assert report.removed == 2 and report.remaining_bytes == 8000
    assert present(store, digests) == [False] * 2 + [True] * 8
    # Under the bound: a pass removes nothing.
    again = await evict_to_size(store, 9000)
    assert again.removed == 0 and again.total_bytes == 8000
    # Exactly at the bound is not over it.
    assert (await evict_to_size(store, 8000)).removed == 0


async def test_min_age_protects_fresh_blobs(store):
    old = await put_aged(store, 3)
    fresh = []
    for i in range(3, 6):
        digest, data = blob(i)
        await store.put(digest, data)  # just uploaded, e.g. inputs of an Execute in flight
        fresh.append(digest)
    report = await evict_to_size(store, 1000)
    assert report.removed == 3
    assert present(store, old) == [False] * 3
    assert present(store, fresh) == [True] * 3
    # With min_age 0 the fresh ones may go too.
    assert (await evict_to_size(store, 1000, min_age=0)).removed == 3


async def test_zero_means_unbounded(store):
    digests = await put_aged(store, 5)
    report = await evict_to_size(store, 0)
    assert report.removed == 0
    assert all(present(store, digests))


async def test_reads_count_as_use_but_only_touch_stale_blobs(store):
    digests = await put_aged(store, 4)
    # Read 0 by get and 1 by read_chunks: both are older than READ_TOUCH_AGE, so both
    # count as used now; 2 was used recently enough that a read does not touch it.
    age(store, digests[2], READ_TOUCH_AGE / 2)
    before = os.stat(store.path_of(digests[2])).st_mtime
    await store.get(digests[0])
    assert [c async for c in store.read_chunks(digests[1])]
    await store.get(digests[2])
    assert os.stat(store.path_of(digests[2])).st_mtime == before
    for d in digests[:2]:
        assert os.stat(store.path_of(d)).st_mtime > time.time() - 60
    # min_age 0 so the just-read blobs are candidates; 3 is now the least recently used.
    report = await evict_to_size(store, 3000, low_watermark=1.0, min_age=0)
    assert report.removed == 1
    assert present(store, digests) == [True, True, True, False]


async def test_temp_files_are_never_evicted(store):
    await put_aged(store, 2)
    # A blob being written and a resumable upload's data, both old enough to qualify.
    writing = store.tmp_dir / f"{blob(9)[0].hash}.0123456789abcdef"
    upload = store.tmp_dir / "upload-something"
    for path in (writing, upload):
        path.write_bytes(b"x" * 5000)
        os.utime(path, (time.time() - HOUR, time.time() - HOUR))
    report = await evict_to_size(store, 1, min_age=0)
    assert report.scanned == 2 and report.removed == 2
    assert writing.exists() and upload.exists()


# ----------------------------------------------------------------- the advisory lock


async def test_advisory_lock_is_exclusive_and_released(database_url):
    async with try_advisory_lock(database_url, CAS_EVICTION_LOCK) as first:
        assert first
        async with try_advisory_lock(database_url, CAS_EVICTION_LOCK) as second:
            assert not second
        # A failed attempt releases nothing: the holder still holds it.
        async with try_advisory_lock(database_url, CAS_EVICTION_LOCK) as third:
            assert not third
    async with try_advisory_lock(database_url, CAS_EVICTION_LOCK) as again:
        assert again


async def test_pass_is_skipped_while_another_holds_the_lock(database_url, tmp_path):
    async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
        bound_by_hand(app, 1000)
        digests = await put_aged(app.store, 5)
        async with try_advisory_lock(database_url, CAS_EVICTION_LOCK) as held:
            assert held
            assert await app.evict_once() is None
            assert all(present(app.store, digests))
        report = await app.evict_once()
        assert report is not None and report.removed == 5  # down to 900 bytes: every blob
        # The pass released the lock.
        async with try_advisory_lock(database_url, CAS_EVICTION_LOCK) as held:
            assert held


async def test_a_pass_holds_no_pool_connection_while_it_scans(database_url, tmp_path, monkeypatch):
    settings = server_settings(tmp_path / "cas")
    settings = replace(
        settings, database=replace(settings.database, pool_min_size=1, pool_max_size=1)
    )
    scanning, go_on = threading.Event(), threading.Event()
    real_scan = eviction._scan

    def held_scan(blob_dir):
        scanning.set()
        go_on.wait(30)
        return real_scan(blob_dir)

    async with running_server(settings, database_url) as app:
        bound_by_hand(app, 1000)
        digests = await put_aged(app.store, 5)
        monkeypatch.setattr(eviction, "_scan", held_scan)
        evicting = asyncio.create_task(app.evict_once())
        try:
            assert await asyncio.to_thread(scanning.wait, 30)
            # The pool's only connection is free for the server's calls meanwhile.
            async with app.pool.acquire(timeout=5) as conn:
                assert await conn.fetchval("SELECT 1") == 1
        finally:
            go_on.set()
        report = await evicting
        assert report is not None and report.removed == 5
        assert not any(present(app.store, digests))


async def test_two_servers_sharing_a_cas_take_turns(database_url, tmp_path, monkeypatch):
    settings = server_settings(tmp_path / "cas")
    real_scan = eviction._scan
    other_turned_away = threading.Event()

    def held_scan(blob_dir):
        # The pass that got the lock scans only once the other has tried and given up:
        # the two overlap for sure. (Two scans at once would both wait here in vain.)
        other_turned_away.wait(30)
        return real_scan(blob_dir)

    async with (
        running_server(settings, database_url) as a,
        running_server(settings, database_url) as b,
    ):
        bound_by_hand(a, 5000)
        bound_by_hand(b, 5000)
        digests = await put_aged(a.store, 10)
        monkeypatch.setattr(eviction, "_scan", held_scan)
        passes = [asyncio.create_task(a.evict_once()), asyncio.create_task(b.evict_once())]
        await asyncio.wait(passes, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        other_turned_away.set()
        reports = [await each for each in passes]
        assert sum(r is not None for r in reports) == 1, reports
        assert present(a.store, digests) == [False] * 6 + [True] * 4


# ----------------------------------------------------------------- configuration


def test_config_keys():
    default = settings_from_mapping({})
    assert default.cas.max_size == 0
    assert default.cas.eviction_interval == timedelta(seconds=60)
    s = settings_from_mapping({"cas": {"max_size": "500GiB", "eviction_interval": "5m"}})
    assert s.cas.max_size == 500 * 1024**3
    assert s.cas.eviction_interval == timedelta(minutes=5)
    assert settings_from_mapping({"cas": {"max_size": 0}}).cas.max_size == 0
    assert settings_from_mapping({"cas": {"max_size": "0"}}).cas.max_size == 0
    with pytest.raises(ConfigError, match="cas.max_size"):
        settings_from_mapping({"cas": {"max_size": "lots"}})
    with pytest.raises(ConfigError, match="cas.max_size"):
        settings_from_mapping({"cas": {"max_size": -5}})
    with pytest.raises(ConfigError, match="cas.eviction_interval"):
        settings_from_mapping({"cas": {"eviction_interval": "soon"}})
    with pytest.raises(ConfigError, match="cas.eviction_interval"):
        settings_from_mapping({"cas": {"eviction_interval": 0}})


# ----------------------------------------------------------------- end to end


@pytest.mark.e2e
async def test_server_evicts_and_the_action_cache_notices(
    database_url, tmp_path, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger="expbuild.server.app")
    finished_passes = [0]
    real_evict = server_app.evict_to_size

    async def counted_evict(*args, **kwargs):
        report = await real_evict(*args, **kwargs)
        finished_passes[0] += 1
        return report

    monkeypatch.setattr(server_app, "evict_to_size", counted_evict)
    settings = server_settings(tmp_path / "cas")
    settings = replace(
        settings, cas=replace(settings.cas, max_size=4000, eviction_interval=timedelta(seconds=0.2))
    )
    async with running_server(settings, database_url) as app:
        store = app.store
        async with open_channel(f"127.0.0.1:{app.port}") as channel:
            cas = CasClient(channel)
            blobs = dict(blob(i) for i in range(6))
            assert await cas.upload(blobs)
            digests = list(blobs)
            stdout = digests[0]
            action = digest_of(b"an action whose stdout will be evicted")
            cache = re_grpc.ActionCacheStub(channel)
            await cache.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    action_digest=action.to_proto(),
                    action_result=re_pb2.ActionResult(exit_code=0, stdout_digest=stdout.to_proto()),
                )
            )
            # Everything was uploaded just now, so min_age protects it all: the second
            # pass to finish from here began after the upload, and removed nothing.
            after_upload = finished_passes[0] + 2
            await wait_until(lambda: finished_passes[0] >= after_upload, what="two passes")
            assert present(store, digests) == [True] * 6
            # Age them all at once as far as eviction can tell: holding the replicas'
            # eviction lock, no pass can scan a half-aged store.
            aged = False
            while not aged:
                async with try_advisory_lock(database_url, CAS_EVICTION_LOCK) as held:
                    if held:
                        for i, d in enumerate(digests):
                            age(store, d, 10 * HOUR - i * 60)
                        aged = True
                if not aged:
                    await asyncio.sleep(0.05)  # a pass is running; try again after it
            deadline = time.monotonic() + 10
            while store.path_of(stdout).exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            # 6000 bytes over a 4000-byte bound: down to 3600, the three oldest go.
            assert present(store, digests) == [False] * 3 + [True] * 3
            missing = await cas.find_missing(digests)
            assert set(missing) == set(digests[:3])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cache.GetActionResult(
                    re_pb2.GetActionResultRequest(action_digest=action.to_proto())
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    lines = [r.getMessage() for r in caplog.records if "CAS eviction" in r.getMessage()]
    assert lines and all(
        re.fullmatch(
            r"CAS eviction: removed \d+ blobs \([\d.]+ MiB\), store now [\d.]+ MiB of [\d.]+ MiB",
            line,
        )
        for line in lines
    ), lines


# ----------------------------------------------------------------- build without the bytes


async def test_an_action_cache_hit_keeps_every_blob_it_names_through_eviction(
    database_url, tmp_path
):
    """Bazel's --remote_download_minimal leaves outputs in the CAS only. A cache hit
    refreshes every blob its entry names — files, streams, a Tree's files, and the whole
    Directory tree of a root_directory_digest (BuildStream's format) — so the LRU pass
    between that hit and a later use removes the rest and keeps them."""

    def message(m) -> tuple[Digest, bytes]:
        data = m.SerializeToString()
        return digest_of(data), data

    files = dict(blob(i, 200) for i in range(6))
    out_file, stdout, tree_file, deep_file, top_file, unrelated = files
    leaf = re_pb2.FileNode(name="f", digest=deep_file.to_proto())
    deep_dir, deep_dir_data = message(re_pb2.Directory(files=[leaf]))
    root_dir, root_dir_data = message(
        re_pb2.Directory(
            files=[re_pb2.FileNode(name="top", digest=top_file.to_proto())],
            directories=[re_pb2.DirectoryNode(name="deep", digest=deep_dir.to_proto())],
        )
    )
    tree, tree_data = message(
        re_pb2.Tree(
            root=re_pb2.Directory(files=[re_pb2.FileNode(name="t", digest=tree_file.to_proto())])
        )
    )
    blobs = {**files, deep_dir: deep_dir_data, root_dir: root_dir_data, tree: tree_data}
    named = [d for d in blobs if d != unrelated]
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="o", digest=out_file.to_proto())],
        output_directories=[
            re_pb2.OutputDirectory(path="t", tree_digest=tree.to_proto()),
            re_pb2.OutputDirectory(path="r", root_directory_digest=root_dir.to_proto()),
        ],
        stdout_digest=stdout.to_proto(),
    )
    action = digest_of(b"an action built without the bytes")
    async with running_server(server_settings(tmp_path / "cas"), database_url) as app:
        bound_by_hand(app, 1)
        async with open_channel(f"127.0.0.1:{app.port}") as channel:
            assert await CasClient(channel).upload(blobs)
            cache = re_grpc.ActionCacheStub(channel)
            await cache.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    action_digest=action.to_proto(), action_result=result
                )
            )
            # A day later (as far as the LRU can tell), the build uses the entry again.
            for digest in blobs:
                age(app.store, digest, 24 * HOUR)
            request = re_pb2.GetActionResultRequest(action_digest=action.to_proto())
            assert await cache.GetActionResult(request) == result
            report = await app.evict_once()
            # Bounded to one byte, the pass removed all it could: the unrelated blob.
            assert report is not None and report.removed == 1
            assert present(app.store, named) == [True] * len(named)
            assert present(app.store, [unrelated]) == [False]
            # The later use: still a complete hit.
            assert await cache.GetActionResult(request) == result
            # Unused for a day and not hit since, an entry's blobs do go, and the entry
            # with them: it is a miss, not a hit naming blobs that are gone.
            for digest in blobs:
                if store_has(app.store, digest):
                    age(app.store, digest, 24 * HOUR)
            await app.evict_once()
            assert present(app.store, named) == [False] * len(named)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cache.GetActionResult(request)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


def store_has(store: FileStore, digest: Digest) -> bool:
    return store.path_of(digest).exists()


def test_a_scan_is_followed_by_a_pause_twenty_times_as_long_as_itself():
    """On a store of millions of blobs a scan takes seconds; its loop then waits in
    proportion, so scanning never takes more than ~5 % of the time."""
    assert pause_after(30.0, 0.2, SCAN_PACE) == 30.0  # a small store: the clock decides
    assert pause_after(30.0, 3.0, SCAN_PACE) == 60.0
    assert pause_after(60.0, 10.0, SCAN_PACE) == 200.0
    assert pause_after(5.0, 10.0, 0.0) == 5.0  # loops without a pace keep their interval
