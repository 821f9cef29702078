"""Apply `expbuild/migrations/NNNN_name.sql` in order, each once, recorded in schema_migrations.

Replicas starting together serialise on an advisory lock, so exactly one applies each file.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from expbuild.db.queries import sql

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_FILE = re.compile(r"^(\d{4})_([\w-]+)\.sql$")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def available_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in directory.glob("*.sql"):
        match = _FILE.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a version number in {directory}")
    return found


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply what is missing; returns the migrations applied by this call."""
    applied_now: list[Migration] = []
    async with conn.transaction():
        await conn.execute(sql("lock_migrations"))
        await conn.execute(sql("create_migrations_table"))
        done = {row["version"] for row in await conn.fetch(sql("applied_migrations"))}
        for migration in available_migrations(directory):
            if migration.version in done:
                continue
            log.info("Applying migration %04d_%s", migration.version, migration.name)
            await conn.execute(migration.path.read_text())
            await conn.execute(sql("record_migration"), migration.version, migration.name)
            applied_now.append(migration)
    if applied_now:
        # Fresh statistics so the planner uses the partial indexes from the first query on.
        await conn.execute(sql("analyze"))
    return applied_now
