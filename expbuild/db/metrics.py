"""Queue gauges read from Postgres for the metrics endpoint."""

from __future__ import annotations

from expbuild.db.queries import sql
from expbuild.db.queue import Executor


async def queue_gauges(db: Executor) -> dict[str, float]:
    row = await db.fetchrow(sql("queue_gauges"))
    return {key: float(value) for key, value in row.items()}
