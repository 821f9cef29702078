"""Accepting results: a worker reports a task's ExecuteResponse, or hands the lease back.

Both are fenced by the lease token (`expbuild.db.queue`): a stale worker's late report
changes nothing and is refused with `Aborted`. And both act for a worker only when the
caller is the credential that registered it (`expbuild.scheduling.workers.acting_worker`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from expbuild.auth.principal import Principal
from expbuild.db import queue
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.scheduling.task_names import task_name
from expbuild.scheduling.workers import acting_worker
from expbuild.text import check_no_nul, shorten

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AcceptedResult:
    succeeded: bool
    task: queue.CompletedTask  # when it was queued, leased and completed (for metrics)


async def accept_result(
    pool: asyncpg.Pool,
    principal: Principal,
    worker_id: str,
    task_id: int,
    lease_token: str,
    response: re_pb2.ExecuteResponse,
) -> AcceptedResult:
    """Finish the task with the worker's response: whether the run succeeded, and when.

    Only a successful run that exited 0 goes to the action cache (the task's
    do_not_cache is honoured by the statement)."""
    worker_id = await acting_worker(pool, principal, worker_id)
    succeeded = response.status.code == 0 and response.HasField("result")
    cacheable = succeeded and response.result.exit_code == 0
    done = await queue.complete_task(
        pool,
        task_id,
        lease_token,
        worker_id,
        succeeded=succeeded,
        response=response.SerializeToString(),
        cache_result=response.result.SerializeToString() if cacheable else None,
        detail={"exit_code": response.result.exit_code, "status": response.status.code},
    )
    log.info(
        "Task %s completed on worker %s (exit code %d)",
        task_name(task_id),
        worker_id,
        response.result.exit_code,
    )
    return AcceptedResult(succeeded, done)


async def release_lease(
    pool: asyncpg.Pool,
    principal: Principal,
    worker_id: str,
    task_id: int,
    lease_token: str,
    reason: str,
) -> None:
    """Hand the lease back unrun: the task is queued again at once."""
    worker_id = await acting_worker(pool, principal, worker_id)
    reason = check_no_nul(reason, "reason") or "released by worker"
    await queue.release_task(pool, task_id, lease_token, worker_id, reason)
    log.info("Task %s handed back by worker %s: %s", task_name(task_id), worker_id, shorten(reason))
