"""Workers: registration, heartbeats that extend leases, deregistration, liveness."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from expbuild.db.pool import Database
from expbuild.db.queries import sql
from expbuild.errors import InvalidArgument, NotFound, PermissionDenied
from expbuild.reapi.platforms import PlatformSpec, normalize_platform
from expbuild.text import quoted


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    name: str
    hostname: str
    platform: PlatformSpec
    max_concurrent: int
    state: str
    version: str
    registered_at: datetime
    last_heartbeat_at: datetime
    running: int = 0
    principal: str = ""  # the credential that registered it (only get_worker reads it)


@dataclass
class HeartbeatOutcome:
    known: bool  # False: the server has no such worker; it must register again
    worker_state: str | None = None
    running: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    # Leases the worker holds but did not report: expired now, for the reaper to requeue.
    unreported: int = 0


def new_worker_id() -> str:
    return f"worker-{uuid.uuid4().hex[:12]}"


async def register_worker(
    db: Database,
    *,
    worker_id: str,
    name: str,
    hostname: str,
    platform: PlatformSpec,
    max_concurrent: int,
    version: str = "",
    principal: str = "",
) -> str:
    """Insert or revive the worker; PermissionDenied when `worker_id` belongs to
    another principal."""
    if max_concurrent < 1:
        raise InvalidArgument(f"max_concurrent_tasks must be at least 1, got {max_concurrent}")
    row = await db.fetchrow(
        sql("register_worker"),
        worker_id or new_worker_id(),
        name,
        hostname,
        normalize_platform(platform),
        max_concurrent,
        version,
        principal,
    )
    if row is None:
        raise PermissionDenied(
            f"worker id {quoted(worker_id)} was registered with another credential; register "
            "without an id to get one of your own"
        )
    return row["id"]


async def worker_principal(db: Database, worker_id: str) -> str | None:
    """The principal that registered `worker_id`; None when there is no such worker."""
    return await db.fetchval(sql("worker_principal"), worker_id)


async def heartbeat(
    db: Database,
    worker_id: str,
    running: list[tuple[int, str]],
    lease_duration: timedelta,
    reconcile_margin: timedelta = timedelta(seconds=5),
) -> HeartbeatOutcome:
    """Extend the leases of `running` (task id, lease token) and report each one's fate;
    expire the worker's other leases granted more than `reconcile_margin` ago."""
    ids = [task_id for task_id, _ in running]
    tokens = []
    for task_id, token in running:
        try:
            tokens.append(uuid.UUID(token))
        except (ValueError, TypeError):
            raise InvalidArgument(
                f"lease token {quoted(token)} for task {task_id} is not a UUID"
            ) from None
    rows = await db.fetch(
        sql("heartbeat"), worker_id, ids, tokens, lease_duration, reconcile_margin
    )
    if not rows:
        return HeartbeatOutcome(known=False)
    outcome = HeartbeatOutcome(
        known=True, worker_state=rows[0]["worker_state"], unreported=rows[0]["unreported"]
    )
    for row in rows:
        if row["task_id"] is None:
            continue
        getattr(outcome, row["fate"]).append(row["task_id"])
    return outcome


async def deregister_worker(db: Database, worker_id: str) -> int:
    """Mark the worker offline and requeue its leases; returns how many were requeued."""
    row = await db.fetchrow(sql("deregister_worker"), worker_id)
    if not row["found"]:
        raise NotFound(f"worker {worker_id} is not registered")
    return row["requeued"]


async def open_session(db: Database, worker_id: str, session_id: uuid.UUID) -> None:
    """Make `session_id` the worker's current session; NotFound for an unknown worker."""
    if await db.fetchval(sql("open_worker_session"), worker_id, session_id) is None:
        raise NotFound(f"worker {worker_id} is not registered; register again")


async def close_session(db: Database, worker_id: str, session_id: uuid.UUID) -> bool:
    """Record that the session broke; False if it was no longer the worker's current one."""
    return await db.fetchval(sql("close_worker_session"), worker_id, session_id) is not None


async def mark_disconnected_workers_offline(db: Database, grace: timedelta) -> list[str]:
    rows = await db.fetch(sql("mark_disconnected_workers_offline"), grace)
    return [r["id"] for r in rows]


async def mark_silent_workers_offline(db: Database, offline_timeout: timedelta) -> list[str]:
    rows = await db.fetch(sql("mark_silent_workers_offline"), offline_timeout)
    return [r["id"] for r in rows]


def _record(r) -> WorkerRecord:
    return WorkerRecord(
        worker_id=r["id"],
        name=r["name"],
        hostname=r["hostname"],
        platform=r["platform"],
        max_concurrent=r["max_concurrent"],
        state=r["state"],
        version=r["version"],
        registered_at=r["registered_at"],
        last_heartbeat_at=r["last_heartbeat_at"],
        running=r.get("running", 0),
        principal=r.get("principal", ""),
    )


async def get_worker(db: Database, worker_id: str) -> WorkerRecord:
    row = await db.fetchrow(sql("get_worker"), worker_id)
    if row is None:
        raise NotFound(f"worker {worker_id} is not registered")
    return _record(row)


async def list_workers(db: Database, include_offline: bool = False) -> list[WorkerRecord]:
    return [_record(r) for r in await db.fetch(sql("list_workers"), include_offline)]


async def platform_offer(db: Database, platform: PlatformSpec) -> tuple[bool, bool, list[dict]]:
    """(some online worker offers `platform`, any worker online, the platforms online)."""
    row = await db.fetchrow(sql("platform_is_offered"), normalize_platform(platform))
    return row["offered"], row["any_online"], row["offers"]


async def drain_worker(db: Database, worker: str) -> WorkerRecord:
    """Mark the worker (id, or unique name) draining; NotFound when no such live worker."""
    worker_id = await db.fetchval(sql("drain_worker"), worker)
    if worker_id is None:
        raise NotFound(
            f"no online worker has the id or unique name {quoted(worker)}; see `expbuild workers list`"
        )
    return await get_worker(db, worker_id)
