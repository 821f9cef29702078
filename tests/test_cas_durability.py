"""`[cas] fsync`: what each mode writes, and the crash contract (expbuild/cas/durability.py).

A real OS crash cannot be staged in a test; what it leaves behind can: the marker of a
run from another boot, and a blob file of the right size whose bytes never reached the
disk. A kill -9 is staged for real, with a server process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from expbuild.cas import durability as cas_durability
from expbuild.cas.durability import boot_id
from expbuild.cas.store import FileStore
from expbuild.client.cas import CasClient
from expbuild.client.channel import open_channel
from expbuild.config import ConfigError, settings_from_mapping
from expbuild.digest import digest_of
from expbuild.errors import NotFound
from tests.processes import server_env, start, wait_healthy


def markers(root: Path) -> list[Path]:
    return sorted((root / "markers").iterdir())


def pretend_the_os_crashed(root: Path) -> None:
    """Rename this run's markers as if they were left by an earlier boot of this host."""
    for marker in markers(root):
        host, _, rest = marker.name.partition(".")
        _boot, _, pid = rest.rpartition(".")
        marker.rename(marker.with_name(f"{host}.another-boot.{pid}"))


def damage(store: FileStore, digest) -> None:
    """The blob's file keeps its size but loses its bytes, as unflushed data does."""
    path = store.path_of(digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"\0" * digest.size_bytes)


async def test_after_an_os_crash_damaged_blobs_are_deleted_before_anything_is_served(
    tmp_path: Path,
):
    root = tmp_path / "cas"
    store = FileStore(root, fsync="never")
    blobs = {digest_of(f"blob {n}".encode()): f"blob {n}".encode() for n in range(5)}
    for digest, data in blobs.items():
        await store.put(digest, data)
    damaged, intact = list(blobs)[0], list(blobs)[1:]
    damage(store, damaged)
    pretend_the_os_crashed(root)

    reopened = FileStore(root, fsync="never")
    assert not await reopened.has(damaged)
    assert await reopened.find_missing(blobs) == [damaged]
    with pytest.raises(NotFound):
        await reopened.get(damaged)
    for digest in intact:
        assert await reopened.get(digest) == blobs[digest]
    # The old boot's marker is gone; this run has its own.
    assert [m.name.split(".")[1] for m in markers(root)] == [boot_id()]


async def test_blobs_older_than_the_crash_window_are_not_rehashed(tmp_path: Path):
    root = tmp_path / "cas"
    store = FileStore(root, fsync="batch")
    old, new = digest_of(b"old enough"), digest_of(b"written last")
    await store.put(old, b"old enough")
    await store.put(new, b"written last")
    # The window opens at the last flush; a blob last modified before it is on disk.
    long_ago = time.time() - 3600
    os.utime(store.path_of(old), (long_ago, long_ago))
    store.layout.durability.flush()
    damage(store, old)  # stands in for "not looked at": its bytes are only read if hashed
    os.utime(store.path_of(old), (long_ago, long_ago))
    damage(store, new)
    os.utime(store.path_of(new), None)
    pretend_the_os_crashed(root)

    reopened = FileStore(root, fsync="batch")
    assert await reopened.find_missing([old, new]) == [new]


async def test_a_restart_in_the_same_boot_trusts_the_store(tmp_path: Path):
    """A kill -9 leaves its marker behind but loses nothing: no scan, nothing deleted."""
    root = tmp_path / "cas"
    store = FileStore(root, fsync="never")
    digest = digest_of(b"survives")
    await store.put(digest, b"survives")
    assert len(markers(root)) == 1  # not closed: as after a kill -9

    reopened = FileStore(root, fsync="never")
    assert await reopened.get(digest) == b"survives"


async def test_batch_mode_flushes_written_blobs_and_narrows_the_window(tmp_path: Path):
    root = tmp_path / "cas"
    store = FileStore(root, fsync="batch")
    (marker,) = markers(root)
    opened_at = float(marker.read_text())
    written_at = time.time()
    await store.put(digest_of(b"flush me"), b"flush me")

    deadline = time.monotonic() + 10
    while float(marker.read_text()) < written_at:
        assert time.monotonic() < deadline, "the batch flusher never ran"
        await asyncio.sleep(0.05)
    assert float(marker.read_text()) > opened_at
    assert not store.layout.durability.dirty
    store.close()
    assert markers(root) == []


class _ObservedLock:
    """The store's marker lock, telling the test when a second caller starts waiting."""

    def __init__(self, lock) -> None:
        self.lock = lock
        self.callers = 0
        self.second_caller = threading.Event()

    def __enter__(self):
        self.callers += 1
        if self.callers == 2:
            self.second_caller.set()
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def test_a_close_during_a_batch_flush_waits_for_it_and_leaves_no_marker(
    tmp_path: Path, monkeypatch
):
    root = tmp_path / "cas"
    store = FileStore(root, fsync="batch")
    durability = store.layout.durability
    lock = durability._marker_lock = _ObservedLock(durability._marker_lock)
    flushing = threading.Event()
    real_flush = cas_durability.flush_filesystem

    def flush_until_close_waits(root: Path) -> None:
        if not flushing.is_set():  # the flusher's call: hold it until close() is waiting
            flushing.set()
            assert lock.second_caller.wait(10), "close() never reached the marker lock"
        real_flush(root)

    monkeypatch.setattr(cas_durability, "flush_filesystem", flush_until_close_waits)
    failures: list[BaseException] = []

    def flusher() -> None:
        try:
            durability.flush()
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    flush_thread = threading.Thread(target=flusher)
    flush_thread.start()
    assert flushing.wait(10)
    store.close()  # before the lock, this removed the marker under the flush's feet
    flush_thread.join(10)
    assert failures == []
    assert list((root / "markers").iterdir()) == []  # no marker, no leftover .tmp


async def test_always_mode_fsyncs_each_blob_and_keeps_no_window(tmp_path: Path):
    root = tmp_path / "cas"
    store = FileStore(root, fsync="always")
    await store.put(digest_of(b"durable"), b"durable")
    assert store.layout.fsync
    assert markers(root) == []
    assert not store.layout.durability.dirty


def test_fsync_setting_is_checked():
    settings = settings_from_mapping({"cas": {"fsync": "never"}})
    assert settings.cas.fsync == "never"
    assert settings_from_mapping({}).cas.fsync == "batch"
    with pytest.raises(ConfigError, match="cas.fsync"):
        settings_from_mapping({"cas": {"fsync": "sometimes"}})


async def test_kill_9_of_the_server_loses_no_acknowledged_blob(database_url, tmp_path: Path):
    env = {**server_env(database_url, tmp_path), "EXPBUILD_CAS__FSYNC": "never"}
    process = start("server", ["expbuild", "server"], tmp_path, env)
    address = env["EXPBUILD_SERVER__ADDRESS"]
    try:
        await asyncio.to_thread(wait_healthy, address, process)
        blobs: dict = {}
        for n in range(50):
            data = os.urandom(100 + n * 997)
            blobs[digest_of(data)] = data
        big = os.urandom(3 * 1024 * 1024)  # goes by ByteStream
        blobs[digest_of(big)] = big
        async with open_channel(address) as channel:
            cas = await CasClient.connect(channel)
            await cas.upload(blobs)
    finally:
        process.popen.send_signal(signal.SIGKILL)
        process.popen.wait()

    store = FileStore(tmp_path / "cas", fsync="never")
    for digest, data in blobs.items():
        assert await store.get(digest) == data
