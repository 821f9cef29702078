"""Apply `migrations/NNNN_name.sql` in order, each once, recorded in schema_migrations.

Replicas starting together serialise on an advisory lock, so exactly one applies each file.
The files live in the checkout's top-level `migrations/`; the wheel carries them inside the
package as `expbuild/migrations/` (hatch force-include), so an installed copy finds them too.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from expbuild.db.queries import sql

_FILE = re.compile(r"^(\d{4})_([\w-]+)\.sql$")
log = logging.getLogger(__name__)


def find_migrations_dir() -> Path:
    """The checkout's `migrations/`, else the installed wheel's `expbuild/migrations/`."""
    package = Path(__file__).resolve().parent.parent
    checkout, installed = package.parent / "migrations", package / "migrations"
    # Only a source checkout (pyproject.toml beside the package) may supply the top-level
    # folder: in site-packages a sibling `migrations/` would belong to some other project.
    if (package.parent / "pyproject.toml").is_file() and checkout.is_dir():
        if any(installed.glob("*.sql")):
            raise FileNotFoundError(
                f"migrations in two places: {checkout} and {installed}; "
                "the schema lives in migrations/ only (the wheel copies it into the package)"
            )
        return checkout
    if installed.is_dir():
        return installed
    raise FileNotFoundError(f"no migrations found: neither {checkout} nor {installed} exists")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def available_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or find_migrations_dir()
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


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[Migration]:
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
