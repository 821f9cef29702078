"""The connection pool every replica uses (expbuild/db/pool.py)."""

from __future__ import annotations

import asyncpg

from expbuild.db.pool import create_pool


async def test_a_released_connection_costs_no_reset_round_trip(database_url):
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        backend = await pool.fetchval("SELECT pg_backend_pid()")
        await pool.fetchval("SELECT 'the last query' AS marker")
        observer = await asyncpg.connect(database_url)
        try:
            last = await observer.fetchval(
                "SELECT query FROM pg_stat_activity WHERE pid = $1", backend
            )
        finally:
            await observer.close()
        assert last == "SELECT 'the last query' AS marker"  # not asyncpg's RESET ALL & co.
    finally:
        await pool.close()


async def test_a_transaction_left_open_is_rolled_back_on_release(database_url):
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN; CREATE TABLE left_open (n int)")
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('left_open')") is None
    finally:
        await pool.close()
