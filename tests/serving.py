"""Start real server replicas and workers inside the test's event loop, on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from expbuild.config import BackendSettings, Settings, WorkerSettings, settings_from_mapping
from expbuild.server.app import ServerApp
from expbuild.worker.agent import WorkerAgent


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
