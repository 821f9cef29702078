"""Queue gauges read from Postgres for the metrics endpoint."""

from __future__ import annotations

from dataclasses import dataclass

from expbuild.db.pool import Database
from expbuild.db.queries import sql
from expbuild.db.queue import PlatformSpec


@dataclass(frozen=True)
class QueueDepth:
    state: str
    platform: PlatformSpec
    instance_name: str
    tasks: int


async def queue_gauges(db: Database) -> dict[str, float]:
    row = await db.fetchrow(sql("queue_gauges"))
    return {key: float(value) for key, value in row.items()}


async def queue_depth(db: Database) -> list[QueueDepth]:
    return [QueueDepth(**row) for row in await db.fetch(sql("queue_depth"))]
