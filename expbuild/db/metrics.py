"""Queue gauges read from Postgres for the metrics endpoint."""

from __future__ import annotations

from dataclasses import dataclass

from expbuild.db.queries import sql
from expbuild.db.queue import Executor, PlatformSpec


@dataclass(frozen=True)
class QueueDepth:
    state: str
    platform: PlatformSpec
    instance_name: str
    tasks: int


async def queue_gauges(db: Executor) -> dict[str, float]:
    row = await db.fetchrow(sql("queue_gauges"))
    return {key: float(value) for key, value in row.items()}


async def queue_depth(db: Executor) -> list[QueueDepth]:
    return [QueueDepth(**row) for row in await db.fetch(sql("queue_depth"))]
