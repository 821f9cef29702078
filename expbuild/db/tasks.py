"""Tasks as operators see them: listings, one task's history, counts by state.

Read-only; used by the status page and the task admin RPCs (`expbuild tasks ...`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from expbuild.db.pool import Database
from expbuild.db.queries import sql
from expbuild.db.queue import PlatformSpec
from expbuild.errors import InvalidArgument, NotFound
from expbuild.text import quoted

MAX_LIST = 1000
TASK_STATES = ("queued", "leased", "completed", "failed", "cancelled")
"""Every state a task can be in (`tasks.state`), in the order of its life."""
MAX_TASK_ID = 2**63 - 1


@dataclass(frozen=True)
class TaskSummary:
    task_id: int
    instance_name: str
    action_digest: str
    state: str
    platform: PlatformSpec
    priority: int
    attempts: int
    max_attempts: int
    worker_id: str | None
    queued_at: datetime
    leased_at: datetime | None
    completed_at: datetime | None
    error: str | None


@dataclass(frozen=True)
class TaskEvent:
    event_id: int
    at: datetime
    event: str
    worker_id: str | None
    attempt: int | None
    detail: dict[str, Any]
    worker_name: str | None
    worker_hostname: str | None


@dataclass(frozen=True)
class TaskHistory:
    task_id: int
    summary: TaskSummary | None  # None once the finished task was purged
    events: list[TaskEvent]
    operations: list[str]


@dataclass(frozen=True)
class StateCount:
    """How many tasks of one instance and platform requirement are in `state`."""

    state: str
    platform: PlatformSpec
    instance_name: str
    tasks: int


def _summary(row) -> TaskSummary:
    values = dict(row)
    return TaskSummary(task_id=values.pop("id"), **values)


async def list_tasks(
    db: Database,
    *,
    state: str | None = None,
    platform: PlatformSpec | None = None,
    since: datetime | None = None,
    limit: int = 50,
) -> list[TaskSummary]:
    if state is not None and state not in TASK_STATES:
        raise InvalidArgument(f"unknown task state {state!r}; one of {', '.join(TASK_STATES)}")
    if limit <= 0 or limit > MAX_LIST:
        raise InvalidArgument(f"limit {limit} is out of range: 1 to {MAX_LIST}")
    rows = await db.fetch(sql("list_tasks"), state, platform or None, since, limit)
    return [_summary(row) for row in rows]


async def resolve_task(db: Database, task: str) -> int:
    """A task id from `42`, `task-42` or an operation name; NotFound when none matches."""
    raw = task.strip().removeprefix("task-")
    # ASCII digits only (int() takes others) and within the bigint ids; anything else
    # can only be an operation name.
    if raw.isascii() and raw.isdigit() and int(raw) <= MAX_TASK_ID:
        return int(raw)
    if not raw:
        raise InvalidArgument("the task is empty; give a task id (task-42) or an operation name")
    task_id = await db.fetchval(sql("task_for_operation"), task.strip())
    if task_id is None:
        raise NotFound(f"no task or operation named {quoted(task)} (its task may have been purged)")
    return task_id


async def task_history(db: Database, task_id: int) -> TaskHistory:
    """The task (if still kept) and every event recorded for it; NotFound if neither."""
    row = await db.fetchrow(sql("get_task_summary"), task_id)
    events = [
        TaskEvent(event_id=r["id"], **{k: v for k, v in r.items() if k != "id"})
        for r in await db.fetch(sql("task_events"), task_id)
    ]
    if row is None and not events:
        raise NotFound(f"no task task-{task_id}")
    operations = [r["name"] for r in await db.fetch(sql("task_operations"), task_id)]
    return TaskHistory(task_id, _summary(row) if row else None, events, operations)


async def state_counts(db: Database, finished_within: timedelta) -> list[StateCount]:
    return [StateCount(**row) for row in await db.fetch(sql("task_state_counts"), finished_within)]
