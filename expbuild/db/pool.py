"""Connection pools with the session settings every ExpBuild connection needs."""

from __future__ import annotations

import json

import asyncpg


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come back as Python objects and accept them as parameters.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


SERVER_SETTINGS = {
    # A transaction left open by a bug must not hold row locks (and block the queue) forever.
    "idle_in_transaction_session_timeout": "60000",
    "application_name": "expbuild",
}


async def create_pool(url: str, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        server_settings=SERVER_SETTINGS,
    )


async def connect(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url, server_settings=SERVER_SETTINGS)
    await _init_connection(conn)
    return conn
