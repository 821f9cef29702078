"""Queue gauges read from Postgres for the metrics endpoint."""

from __future__ import annotations

from expbuild.db.pool import Database
from expbuild.db.queries import sql
from expbuild.db.tasks import StateCount


async def queue_gauges(db: Database) -> dict[str, float]:
    row = await db.fetchrow(sql("queue_gauges"))
    return {key: float(value) for key, value in row.items()}


async def queue_depth(db: Database) -> list[StateCount]:
    """Unfinished tasks (queued, leased) by state, platform and instance."""
    return [StateCount(**row) for row in await db.fetch(sql("queue_depth"))]
