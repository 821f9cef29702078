"""Advisory locks that let one process among several do a piece of shared work.

Each lock is held on a connection of its own, opened for it and closed with it, never
on a pool's: the work it guards (a CAS eviction pass scans a whole directory tree) may
take long, and must not keep a connection the pool's callers are waiting for.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from expbuild.db.pool import connect
from expbuild.db.queries import sql

# Lock keys: any constant bigint, one per kind of work, the same in every process that
# shares the database.
CAS_EVICTION_LOCK = 0x45_58_50_43_41_53_45_56  # "EXPCASEV"
"""Replicas sharing one CAS take turns evicting (replicas with different CAS directories
on one database take turns too, which costs at most a skipped pass)."""


@contextlib.asynccontextmanager
async def try_advisory_lock(database_url: str, key: int) -> AsyncIterator[bool]:
    """Try once to take session advisory lock `key`; yield whether it was taken.

    Held until the block ends, on a connection opened for it: if the process dies, the
    session and the lock go with it. A failure to connect raises as `asyncpg` does.
    """
    conn = await connect(database_url)
    try:
        acquired = bool(await conn.fetchval(sql("try_advisory_lock"), key))
        try:
            yield acquired
        finally:
            if acquired:
                # If this fails the connection is broken, and the lock went with its session.
                with contextlib.suppress(Exception):
                    await conn.fetchval(sql("advisory_unlock"), key)
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


__all__ = ["CAS_EVICTION_LOCK", "try_advisory_lock"]
