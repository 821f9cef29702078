"""Migrations: applied once, in order, even when replicas start together."""

from __future__ import annotations

import asyncio

import asyncpg

from expbuild.db.migrate import available_migrations, find_migrations_dir, migrate
from tests.conftest import with_database


async def test_replicas_starting_together_apply_each_migration_once(postgres_admin_url):
    admin = await asyncpg.connect(postgres_admin_url)
    await admin.execute("DROP DATABASE IF EXISTS expbuild_migrate_race")
    await admin.execute("CREATE DATABASE expbuild_migrate_race")
    url = with_database(postgres_admin_url, "expbuild_migrate_race")
    try:
        conns = [await asyncpg.connect(url) for _ in range(6)]
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        versions = sorted(m.version for batch in applied for m in batch)
        assert versions == [m.version for m in available_migrations()]
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == versions
        assert await migrate(conns[0]) == []  # idempotent
        for conn in conns:
            await conn.close()
    finally:
        await admin.execute("DROP DATABASE IF EXISTS expbuild_migrate_race WITH (FORCE)")
        await admin.close()


def test_migration_files_are_numbered_without_gaps():
    versions = [m.version for m in available_migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_migrations_live_in_one_place_only():
    """The checkout's top-level migrations/ is the only source; the wheel copies it."""
    found = find_migrations_dir()
    assert found.name == "migrations" and (found.parent / "pyproject.toml").is_file()
    assert not list((found.parent / "expbuild" / "migrations").glob("*.sql"))
