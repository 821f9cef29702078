"""Worker lifecycle as the Worker API sees it: register, heartbeat, deregister.

A worker is bound to the credential (principal) that registered it: only that credential
may register its id again, heartbeat, poll, or report and hand back tasks for it, so one
worker's token cannot steal or forge another worker's leases. Ids are the server's to
give: an authenticated worker that names an id nobody holds gets a fresh one. With auth
off every caller is the same anonymous principal and nothing is refused.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import asyncpg

from expbuild.auth.principal import Principal
from expbuild.db import queue, workers
from expbuild.db.workers import HeartbeatOutcome
from expbuild.errors import InvalidArgument, PermissionDenied
from expbuild.reapi.platforms import PlatformSpec, platform_summary
from expbuild.scheduling.task_names import task_name
from expbuild.text import check_no_nul, quoted, shorten

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 255


def require_worker_id(worker_id: str) -> str:
    if not worker_id:
        raise InvalidArgument("worker_id is empty; call RegisterWorker first")
    if len(worker_id) > MAX_NAME_CHARS:  # longer than any id RegisterWorker accepts
        raise InvalidArgument(f"worker_id is {len(worker_id)} characters; at most {MAX_NAME_CHARS}")
    return check_no_nul(worker_id, "worker_id")


async def acting_worker(pool: asyncpg.Pool, principal: Principal, worker_id: str) -> str:
    """The worker id a call acts for, once the caller is known to be the credential that
    registered it; PermissionDenied otherwise. (An unknown id passes: the call itself
    answers that the worker must register again.)"""
    worker_id = require_worker_id(worker_id)
    if principal.authenticated:
        owner = await workers.worker_principal(pool, worker_id)
        if owner is not None and owner != principal.name:
            raise PermissionDenied(
                f"worker {quoted(worker_id)} was registered with another credential; "
                "a worker may act only for the id it registered"
            )
    return worker_id


async def register(
    pool: asyncpg.Pool,
    principal: Principal,
    *,
    worker_id: str,
    name: str,
    hostname: str,
    platform: PlatformSpec,
    max_concurrent: int,
    version: str,
) -> str:
    """Register (or re-register) the worker as `principal`'s; returns its id."""
    for value, what in (
        (worker_id, "worker_id"),
        (name, "name"),
        (hostname, "hostname"),
        (version, "version"),
    ):
        check_no_nul(value, what)
        # They appear in every log line about the worker's tasks: keep those short.
        if len(value) > MAX_NAME_CHARS:
            raise InvalidArgument(f"{what} is {len(value)} characters; at most {MAX_NAME_CHARS}")
    if principal.authenticated and worker_id:
        owner = await workers.worker_principal(pool, worker_id)
        if owner is None:
            worker_id = ""  # an id nobody holds: not the caller's to choose, get a new one
        elif owner != principal.name:
            raise PermissionDenied(
                f"worker id {quoted(worker_id)} was registered with another credential; "
                "register without an id to get one of your own"
            )
    # The statement refuses too (PermissionDenied) should another credential take the id
    # between the check and the write.
    worker_id = await workers.register_worker(
        pool,
        principal=principal.name,
        worker_id=worker_id,
        name=name or hostname or "worker",
        hostname=hostname,
        platform=platform,
        max_concurrent=max_concurrent or 1,
        version=version,
    )
    log.info(
        "Worker %s registered with platform: %s",
        worker_id,
        shorten(str(platform_summary(platform))),
    )
    return worker_id


# A heartbeat may have been sent before a PollTasks reply reached the worker: leases granted
# this recently are not held against it when they are missing from its running set.
UNREPORTED_LEASE_MARGIN = timedelta(seconds=5)


async def heartbeat(
    pool: asyncpg.Pool,
    principal: Principal,
    worker_id: str,
    running: list[tuple[int, str]],
    lease_duration: timedelta,
) -> HeartbeatOutcome:
    """Extend the leases the worker still holds; say which were cancelled or lost.

    Reconciliation: a lease the worker holds but does not report is requeued at once."""
    outcome = await workers.heartbeat(
        pool,
        await acting_worker(pool, principal, worker_id),
        running,
        lease_duration,
        UNREPORTED_LEASE_MARGIN,
    )
    if outcome.unreported:
        for task in await queue.reap_expired_leases(pool):
            log.warning(
                "Task %s %s: worker %s does not report running it",
                task_name(task.task_id),
                "failed" if task.state == "failed" else "requeued",
                task.worker_id,
            )
    return outcome


async def deregister(pool: asyncpg.Pool, principal: Principal, worker_id: str) -> None:
    worker_id = await acting_worker(pool, principal, worker_id)
    requeued = await workers.deregister_worker(pool, worker_id)
    log.info("Worker %s deregistered (%d task(s) requeued)", worker_id, requeued)
