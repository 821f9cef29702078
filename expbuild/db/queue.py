"""The task queue: enqueue, lease, complete, release and reap.

Every function is one SQL statement (one round trip), safe to call from any number of
replicas at once. Fencing: a lease carries a fresh token, and completion or release under
any other token changes nothing and raises `Aborted`.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from expbuild.db.pool import Database
from expbuild.db.queries import sql
from expbuild.digest import Digest
from expbuild.errors import Aborted, InvalidArgument, NotFound
from expbuild.reapi.platforms import PlatformSpec, normalize_platform
from expbuild.text import quoted

log = logging.getLogger(__name__)

_ENQUEUE_RETRIES = 5


@dataclass(frozen=True)
class NewTask:
    instance_name: str
    action_digest: Digest
    platform: PlatformSpec
    priority: int = 0
    do_not_cache: bool = False
    timeout: timedelta | None = None
    max_attempts: int = 3
    # Whose turn the task is in its queue (fair scheduling); tasks of one key run in order.
    invocation_key: str = ""
    # The client's RequestMetadata as {field: value}, recorded with the task and its event.
    request_metadata: dict[str, str] | None = None


@dataclass(frozen=True)
class Enqueued:
    task_id: int
    is_new: bool  # False: joined an identical in-flight action


@dataclass(frozen=True)
class LeasedTask:
    task_id: int
    lease_token: str
    instance_name: str
    action_digest: Digest
    attempt: int
    queued_at: datetime
    timeout: timedelta | None
    do_not_cache: bool


@dataclass(frozen=True)
class CompletedTask:
    """A task that just finished: how long it waited for its (last) lease and ran."""

    task_id: int
    instance_name: str
    platform_json: str  # its platform requirement as JSON (decoded only if wanted)
    waited_seconds: float  # queued -> leased
    ran_seconds: float  # leased -> completed

    @property
    def platform(self) -> PlatformSpec:
        return json.loads(self.platform_json)


@dataclass(frozen=True)
class ReapedTask:
    task_id: int
    state: str  # 'queued' again, or 'failed' after max_attempts
    attempts: int
    reason: str
    worker_id: str | None


@dataclass(frozen=True)
class TaskRecord:
    task_id: int
    instance_name: str
    action_digest: Digest
    state: str
    priority: int
    attempts: int
    max_attempts: int
    worker_id: str | None
    queued_at: datetime
    leased_at: datetime | None
    completed_at: datetime | None
    result: bytes | None
    error_code: int | None
    error: str | None


async def enqueue(
    db: Database, task: NewTask, operation_name: str, principal: str = ""
) -> Enqueued:
    """Queue `task` (or join its identical in-flight twin) and record `operation_name`,
    owned by `principal`."""
    timeout = task.timeout if task.timeout else None
    for _ in range(_ENQUEUE_RETRIES):
        row = await db.fetchrow(
            sql("enqueue_task"),
            task.instance_name,
            str(task.action_digest),
            normalize_platform(task.platform),
            task.priority,
            task.do_not_cache,
            timeout,
            task.max_attempts,
            operation_name,
            principal,
            task.invocation_key,
            task.request_metadata,
        )
        if row is not None:
            return Enqueued(task_id=row["task_id"], is_new=row["is_new"])
        # The in-flight twin finished between our insert attempt and the lookup: try again.
    raise RuntimeError(f"could not enqueue {task.action_digest} after {_ENQUEUE_RETRIES} tries")


async def count_queued(db: Database, instance_name: str, up_to: int) -> int:
    """Queued tasks of the instance, counted no further than `up_to` (a cheap bound check)."""
    return await db.fetchval(sql("count_queued_tasks"), instance_name, up_to)


def lease_statement(limit: int) -> str:
    """lease_tasks with `limit` written in (see queue.sql): $1 worker_id, $2 platform,
    $3 lease duration."""
    return _with_limit("lease_tasks", limit)


def complete_statement(count: int) -> str:
    """complete_tasks for up to `count` elements (see queue.sql): the limit written in is
    `count` rounded up to a power of two."""
    return _with_limit("complete_tasks", 1 << (_positive(count) - 1).bit_length())


@functools.cache
def _with_limit(name: str, limit: int) -> str:
    """Statement `name` with its `{limit}` written in: one prepared statement per limit,
    each with a cached plan that knows it."""
    return sql(name).replace("{limit}", str(_positive(limit)))


def _positive(limit: int) -> int:
    if not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"a statement's limit must be a positive integer, not {limit!r}")
    return limit


async def lease_tasks(
    db: Database, worker_id: str, platform: PlatformSpec, limit: int, lease_duration: timedelta
) -> list[LeasedTask]:
    """Lease up to `limit` matching tasks to the worker in one statement."""
    if limit <= 0:
        return []
    rows = await db.fetch(
        lease_statement(limit), worker_id, normalize_platform(platform), lease_duration
    )
    return [
        LeasedTask(
            task_id=r["id"],
            lease_token=r["lease_token"],
            instance_name=r["instance_name"],
            action_digest=Digest.parse(r["action_digest"]),
            attempt=r["attempts"],
            queued_at=r["queued_at"],
            timeout=r["timeout"],
            do_not_cache=r["do_not_cache"],
        )
        for r in rows
    ]


async def _refusal(db: Database, task_id: int, worker_id: str, verb: str) -> Exception:
    row = await db.fetchrow(sql("describe_task_lease"), task_id)
    if row is None:
        return NotFound(f"task {task_id} does not exist")
    if row["state"] == "leased" and row["worker_id"] != worker_id:
        why = f"it is now leased to worker {row['worker_id']} (attempt {row['attempts']})"
    elif row["state"] == "leased":
        why = f"its lease was renewed (attempt {row['attempts']}) and the token is stale"
    elif row["state"] == "queued":
        why = "its lease expired and it was queued again"
    else:
        why = f"it is already {row['state']}"
    return Aborted(f"cannot {verb} task {task_id} with this lease token: {why}")


def check_lease_token(token: str, task_id: int) -> None:
    """`InvalidArgument` unless `token` can be a lease token (a UUID)."""
    _uuid(token, task_id)


def _uuid(token: str, task_id: int) -> uuid.UUID:
    try:
        return uuid.UUID(token)
    except (ValueError, TypeError, AttributeError):
        raise InvalidArgument(
            f"lease token {quoted(token)} for task {task_id} is not a UUID"
        ) from None


async def complete_task(
    db: Database,
    task_id: int,
    lease_token: str,
    worker_id: str,
    *,
    succeeded: bool,
    response: bytes,
    cache_result: bytes | None,
    detail: dict[str, Any] | None = None,
) -> CompletedTask:
    """Store the worker's ExecuteResponse; put `cache_result` in the action cache if given.

    Raises `Aborted` (and changes nothing) unless `lease_token` is the task's current lease.
    """
    row = await db.fetchrow(
        sql("complete_task"),
        task_id,
        _uuid(lease_token, task_id),
        worker_id,
        "completed" if succeeded else "failed",
        response,
        cache_result,
        detail or None,
    )
    if row is None:
        raise await _refusal(db, task_id, worker_id, "complete")
    return _completed(row)


def _completed(row: asyncpg.Record) -> CompletedTask:
    return CompletedTask(
        task_id=row["id"],
        instance_name=row["instance_name"],
        platform_json=row["platform"],
        waited_seconds=row["waited"],
        ran_seconds=row["ran"],
    )


@dataclass(frozen=True)
class Completion:
    """One leased task's result, for `complete_tasks` and `complete_each`."""

    task_id: int
    lease_token: str
    succeeded: bool
    response: bytes
    cache_result: bytes | None = None
    detail: dict[str, Any] | None = None
    worker_id: str = ""  # the leaseholder (`complete_tasks` takes it as an argument)


async def complete_tasks(
    db: Database, worker_id: str, completions: list[Completion]
) -> dict[int, CompletedTask | Exception]:
    """`complete_task` for several of one worker's leases in one statement and commit.

    Returns, per task id, what `complete_task` would have: the `CompletedTask` when it was
    applied, else the `Aborted` (or `NotFound`) it would have raised; a refused completion
    changes nothing.
    """
    outcomes = await _complete(db, completions, [worker_id] * len(completions))
    return {c.task_id: outcome for c, outcome in zip(completions, outcomes, strict=True)}


async def complete_each(
    db: Database, completions: Sequence[Completion]
) -> list[CompletedTask | Exception]:
    """`complete_task` for several leases, each under its own worker, in one statement and
    commit; per completion, in order, what `complete_task` would have returned or raised
    (`InvalidArgument` for a token that is not a UUID, checked before anything runs)."""
    return await _complete(db, completions, [c.worker_id for c in completions])


async def _complete(
    db: Database, completions: Sequence[Completion], worker_ids: list[str]
) -> list[CompletedTask | Exception]:
    if not completions:
        return []
    tokens = [_uuid(c.lease_token, c.task_id) for c in completions]
    rows = await db.fetch(
        complete_statement(len(completions)),
        [c.task_id for c in completions],
        tokens,
        worker_ids,
        ["completed" if c.succeeded else "failed" for c in completions],
        [c.response for c in completions],
        [c.cache_result for c in completions],
        [c.detail or None for c in completions],
    )
    applied = {r["n"] - 1: _completed(r) for r in rows}
    return [
        applied.get(n) or await _refusal(db, c.task_id, worker_ids[n], "complete")
        for n, c in enumerate(completions)
    ]


async def release_task(
    db: Database, task_id: int, lease_token: str, worker_id: str, reason: str
) -> None:
    """Hand a lease back unrun: the task is queued again at once, its attempt not counted."""
    row = await db.fetchrow(
        sql("release_task"), task_id, _uuid(lease_token, task_id), worker_id, reason
    )
    if row is None:
        raise await _refusal(db, task_id, worker_id, "release")


async def reap_expired_leases(db: Database, batch_size: int = 500) -> list[ReapedTask]:
    rows = await db.fetch(sql("reap_expired_leases"), batch_size)
    return [
        ReapedTask(r["id"], r["state"], r["attempts"], r["reason"], r["worker_id"]) for r in rows
    ]


async def forget_idle_invocations(db: Database, batch_size: int = 1000) -> int:
    """Delete the fair-queue rows of invocations with nothing left queued; returns how many."""
    return len(await db.fetch(sql("forget_idle_invocations"), batch_size))


async def purge_finished_tasks(db: Database, retention: timedelta, batch_size: int = 1000) -> int:
    """Delete finished tasks older than `retention`; returns how many went."""
    return len(await db.fetch(sql("purge_finished_tasks"), retention, batch_size))


async def purge_task_events(db: Database, retention: timedelta, batch_size: int = 5000) -> int:
    """Delete the oldest task events older than `retention`, up to `batch_size`."""
    return len(await db.fetch(sql("purge_task_events"), retention, batch_size))


async def get_task(db: Database, task_id: int) -> TaskRecord:
    r = await db.fetchrow(sql("get_task"), task_id)
    if r is None:
        raise NotFound(f"task {task_id} does not exist")
    return TaskRecord(
        task_id=r["id"],
        instance_name=r["instance_name"],
        action_digest=Digest.parse(r["action_digest"]),
        state=r["state"],
        priority=r["priority"],
        attempts=r["attempts"],
        max_attempts=r["max_attempts"],
        worker_id=r["worker_id"],
        queued_at=r["queued_at"],
        leased_at=r["leased_at"],
        completed_at=r["completed_at"],
        result=r["result"],
        error_code=r["error_code"],
        error=r["error"],
    )
