"""Migrations: applied once, in order, even when replicas start together."""

from __future__ import annotations

import asyncio
import json
import shutil

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


async def test_os_family_is_respelled_for_rows_written_before_the_upgrade(
    postgres_admin_url, tmp_path
):
    """0007: workers registered and tasks queued with `Linux` still meet those written
    after the upgrade, which say the lexicon's `linux`."""
    older = tmp_path / "migrations"
    older.mkdir()
    everything = available_migrations()
    respelling = next(m for m in everything if m.name == "os_family_lexicon")
    for migration in everything:
        if migration.version < respelling.version:
            shutil.copy(migration.path, older / migration.path.name)
    admin = await asyncpg.connect(postgres_admin_url)
    await admin.execute("DROP DATABASE IF EXISTS expbuild_migrate_os_family")
    await admin.execute("CREATE DATABASE expbuild_migrate_os_family")
    conn = await asyncpg.connect(with_database(postgres_admin_url, "expbuild_migrate_os_family"))
    try:
        await migrate(conn, older)
        await conn.execute(
            """INSERT INTO workers (id, name, platform, max_concurrent) VALUES
               ('old', 'old', '{"OSFamily": ["Linux"], "Arch": ["x86_64"]}', 1),
               ('odd', 'odd', '{"OSFamily": ["Plan9", "Windows", "windows"]}', 1)"""
        )
        await conn.execute(
            """INSERT INTO tasks (instance_name, action_digest, platform, state) VALUES
               ('', 'a/1', '{"OSFamily": ["Linux"]}', 'queued'),
               ('', 'b/1', '{"OSFamily": ["Linux"]}', 'completed'),
               ('', 'c/1', '{"OSFamily": ["Linux"]}', 'leased')"""
        )
        applied = [m.name for m in await migrate(conn)]
        assert applied[0] == "os_family_lexicon", applied
        workers = dict(await conn.fetch("SELECT id, platform::text FROM workers"))
        assert json.loads(workers["old"]) == {"OSFamily": ["linux"], "Arch": ["x86_64"]}
        assert sorted(json.loads(workers["odd"])["OSFamily"]) == ["Plan9", "windows"]
        tasks = dict(await conn.fetch("SELECT action_digest, platform::text FROM tasks"))
        # Queued tasks are matched from now on; finished ones are history, left as written.
        assert json.loads(tasks["a/1"]) == {"OSFamily": ["linux"]}
        assert json.loads(tasks["c/1"]) == {"OSFamily": ["linux"]}  # may be requeued
        assert json.loads(tasks["b/1"]) == {"OSFamily": ["Linux"]}
    finally:
        await conn.close()
        await admin.execute("DROP DATABASE IF EXISTS expbuild_migrate_os_family WITH (FORCE)")
        await admin.close()
