"""Operations: the names clients hold while they wait for an execution."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from expbuild.db.pool import Database
from expbuild.db.queries import sql
from expbuild.digest import Digest
from expbuild.errors import NotFound
from expbuild.text import quoted

DONE_STATES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class OperationRecord:
    name: str
    instance_name: str
    action_digest: Digest
    task_id: int | None
    cached_result: bytes | None  # ExecuteResponse when answered from the action cache
    task_state: str | None
    result: bytes | None  # the worker's ExecuteResponse
    error_code: int | None
    error: str | None
    worker_id: str | None
    queued_at: datetime | None
    leased_at: datetime | None
    completed_at: datetime | None
    cancelled_at: datetime | None = None
    created_at: datetime | None = None
    worker_name: str | None = None
    principal: str = ""  # who created it ('' with auth off)

    @property
    def done(self) -> bool:
        return (
            self.cached_result is not None
            or self.cancelled_at is not None
            or self.task_state in DONE_STATES
        )


async def insert_cached_operation(
    db: Database,
    name: str,
    instance_name: str,
    action_digest: Digest,
    response: bytes,
    principal: str = "",
) -> None:
    await db.execute(
        sql("insert_cached_operation"),
        name,
        instance_name,
        str(action_digest),
        response,
        principal,
    )


def _record(r) -> OperationRecord:
    return OperationRecord(
        name=r["name"],
        instance_name=r["instance_name"],
        action_digest=Digest.parse(r["action_digest"]),
        task_id=r["task_id"],
        cached_result=r["cached_result"],
        task_state=r["state"],
        result=r["result"],
        error_code=r["error_code"],
        error=r["error"],
        worker_id=r["worker_id"],
        queued_at=r["queued_at"],
        leased_at=r["leased_at"],
        completed_at=r["completed_at"],
        cancelled_at=r["cancelled_at"],
        created_at=r["created_at"],
        worker_name=r["worker_name"],
        principal=r["principal"],
    )


# `owner`: act only on an operation this principal created (None: anyone's). Another
# principal's operation is "not found", so that its existence does not leak.


async def get_operation(db: Database, name: str, owner: str | None = None) -> OperationRecord:
    r = await db.fetchrow(sql("get_operation"), name, owner)
    if r is None:
        raise NotFound(f"operation {quoted(name)} does not exist")
    return _record(r)


async def cancel_operation(db: Database, name: str, owner: str | None = None) -> bool:
    """Cancel the operation; returns True when its task was cancelled with it."""
    row = await db.fetchrow(sql("cancel_operation"), name, owner)
    if row is None:
        raise NotFound(f"operation {quoted(name)} does not exist")
    return row["task_cancelled"]


async def delete_operation(db: Database, name: str, owner: str | None = None) -> None:
    if await db.fetchval(sql("delete_operation"), name, owner) is None:
        raise NotFound(f"operation {quoted(name)} does not exist")


async def list_operations(
    db: Database,
    *,
    stage: str | None,
    limit: int,
    after: tuple[datetime, str] | None = None,
    owner: str | None = None,
) -> list[OperationRecord]:
    """Newest first; `stage` is 'queued', 'executing', 'completed' or None for all."""
    created, name = after if after else (None, None)
    rows = await db.fetch(sql("list_operations"), stage, created, name, limit, owner)
    return [_record(r) for r in rows]
