"""Start real server replicas inside the test's event loop, on free loopback ports."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from expbuild.config import Settings, settings_from_mapping
from expbuild.server.app import ServerApp


def server_settings(cas_root: Path, **server_overrides) -> Settings:
    settings = settings_from_mapping({"cas": {"root": str(cas_root)}}, source="tests")
    server = replace(
        settings.server,
        address="127.0.0.1:0",
        metrics_address="",
        poll_timeout=timedelta(seconds=2),
        notify_fallback_interval=timedelta(seconds=1),
        reap_interval=timedelta(seconds=1),
        **server_overrides,
    )
    return replace(settings, server=server)


@contextlib.asynccontextmanager
async def running_server(settings: Settings, database_url: str) -> AsyncIterator[ServerApp]:
    app = ServerApp(settings, database_url)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)
