"""Start real server replicas and workers inside the test's event loop, on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc

from expbuild.cas.store import FileStore
from expbuild.cas.uploads import UploadSession, _upload_key
from expbuild.config import BackendSettings, Settings, WorkerSettings, settings_from_mapping
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc
from expbuild.reapi.resource_names import parse_upload_name
from expbuild.server.app import ServerApp
from expbuild.worker.agent import WorkerAgent
from tests.waiting import wait_until


def server_settings(cas_root: Path, **server_overrides) -> Settings:
    settings = settings_from_mapping({"cas": {"root": str(cas_root)}}, source="tests")
    quick = {
        "address": "127.0.0.1:0",
        "metrics_address": "",
        "poll_timeout": timedelta(seconds=2),
        "notify_fallback_interval": timedelta(seconds=1),
        "reap_interval": timedelta(seconds=1),
    }
    server = replace(settings.server, **{**quick, **server_overrides})
    return replace(settings, server=server)


@contextlib.asynccontextmanager
async def running_server(settings: Settings, database_url: str) -> AsyncIterator[ServerApp]:
    app = ServerApp(settings, database_url)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)


@contextlib.asynccontextmanager
async def running_worker(
    app: ServerApp, work_dir: Path, *, name: str = "worker", slots: int = 2, **worker_overrides
) -> AsyncIterator[WorkerAgent]:
    """A real WorkerAgent (host backend) serving `app` until the block ends."""
    defaults = {
        "server_url": f"http://127.0.0.1:{app.port}",
        "name": name,
        "max_concurrent_tasks": slots,
        "poll_timeout": timedelta(seconds=1),
        "backend": BackendSettings(type="host", work_dir=str(work_dir), run_as="root"),
    }
    settings = WorkerSettings(**{**defaults, **worker_overrides})
    agent = WorkerAgent(settings, shutdown_grace=2)
    job = asyncio.create_task(agent.run())
    try:
        deadline = time.monotonic() + 10
        while not agent.worker_id and time.monotonic() < deadline and not job.done():
            await asyncio.sleep(0.02)
        yield agent
    finally:
        agent.request_stop()
        await asyncio.wait_for(job, 20)


def upload_session(store: FileStore, name: str) -> UploadSession | None:
    """The store's session for the ByteStream upload `name`, once a Write opened it. (The
    store's own state: what the server has taken in, which no RPC reports exactly.)"""
    parsed = parse_upload_name(name)
    key = _upload_key(parsed.upload_id, parsed.digest, parsed.compressor)
    return store._uploads._sessions.get(key)


async def break_write(
    store: FileStore,
    bytestream: bytestream_pb2_grpc.ByteStreamStub,
    name: str,
    stream_bytes: bytes,
    chunk: int,
) -> int:
    """Send `stream_bytes` on a ByteStream Write that then stalls without finishing, wait
    until the server has taken every message, then cancel the call as a dropped
    connection would. Returns the committed size QueryWriteStatus reports afterwards."""
    stall = asyncio.Event()

    async def stream():
        for start in range(0, len(stream_bytes), chunk):
            yield bytestream_pb2.WriteRequest(
                resource_name=name if start == 0 else "",
                write_offset=start,
                data=stream_bytes[start : start + chunk],
            )
        await stall.wait()

    call = bytestream.Write(stream())
    session = await wait_until(lambda: upload_session(store, name), what=f"an upload of {name}")
    await wait_until(
        lambda: session.next_offset == len(stream_bytes),
        what=f"the server to take all {len(stream_bytes)} bytes sent",
    )
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await call
    status = await bytestream.QueryWriteStatus(
        bytestream_pb2.QueryWriteStatusRequest(resource_name=name)
    )
    assert not status.complete
    return status.committed_size
