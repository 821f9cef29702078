"""Connection pools with the session settings every ExpBuild connection needs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger(__name__)

# What a query runs on: the pool (each statement on any free connection) or one
# connection (several statements in one transaction).
Database = asyncpg.Pool | asyncpg.Connection


class DatabaseUnavailable(Exception):
    """The database could not be reached in time; the message says where and why."""


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come back as Python objects and accept them as parameters.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to the pool.

    asyncpg's default reset sends `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL` on every release: a round trip and a transaction per query served, about as many
    as the queries themselves. Pool connections never take session locks, LISTEN, SET or
    open cursors (db/locks.py and db/notifications.py use connections of their own), and
    asyncpg still rolls back a transaction left open before this runs.
    """


SERVER_SETTINGS = {
    # A transaction left open by a bug must not hold row locks (and block the queue) forever.
    "idle_in_transaction_session_timeout": "60000",
    "application_name": "expbuild",
}


async def create_pool(
    url: str, min_size: int = 2, max_size: int = 10, *, wait: float = 0.0
) -> asyncpg.Pool:
    """A pool on `url`. With `wait` > 0, keep trying that many seconds (a server may start
    before its database does), then raise DatabaseUnavailable naming the database."""
    deadline = time.monotonic() + wait
    delay = 0.5
    while True:
        try:
            return await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                init=_init_connection,
                reset=_keep_session,
                server_settings=SERVER_SETTINGS,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if (
                isinstance(
                    exc,
                    asyncpg.InvalidAuthorizationSpecificationError
                    | asyncpg.InvalidCatalogNameError,
                )
                or time.monotonic() + delay > deadline
            ):
                raise DatabaseUnavailable(
                    f"cannot connect to the database at {redacted(url)} ({reason}); "
                    "check [database] url (or EXPBUILD_DATABASE__URL) and that PostgreSQL runs"
                ) from None
            log.warning(
                "Database %s unreachable (%s); retrying in %.1fs", redacted(url), reason, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def connect(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url, server_settings=SERVER_SETTINGS)
    await _init_connection(conn)
    return conn
