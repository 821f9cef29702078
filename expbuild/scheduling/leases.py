"""Handing out leases: a worker's long poll for as many tasks as it has free slots.

A poll leases at once when it can; otherwise it waits on the replica's LISTEN wake-ups
(or the fallback interval) and tries again, until its deadline. Each leased task goes out
with its Action and Command, so the worker needs no extra round trip to start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from expbuild.auth.principal import Principal
from expbuild.cas.store import FileStore
from expbuild.config import ServerSettings
from expbuild.db import queue, workers
from expbuild.db.notifications import Notifications
from expbuild.db.queue import LeasedTask
from expbuild.errors import FailedPrecondition, NotFound
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.status import to_status
from expbuild.scheduling.actions import load_action
from expbuild.scheduling.task_names import task_name
from expbuild.scheduling.workers import acting_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PollOutcome:
    assignments: list[Assignment]
    empty_leases: int  # lease statements that found nothing (for metrics)
    leased: bool = False  # the last lease statement leased something


@dataclass(frozen=True)
class Assignment:
    """A leased task with what the worker needs to run it."""

    task: LeasedTask
    action: re_pb2.Action
    command: re_pb2.Command


class LeaseDispatcher:
    """Leases queued tasks to polling workers of this replica."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: FileStore,
        notifications: Notifications,
        settings: ServerSettings,
    ):
        self.pool = pool
        self.store = store
        self.notifications = notifications
        self.settings = settings

    async def poll(
        self,
        principal: Principal,
        worker_id: str,
        max_tasks: int,
        timeout: timedelta | None,
    ) -> PollOutcome:
        """Lease up to `max_tasks` (within the worker's limit) to the worker `principal`
        registered, waiting up to `timeout` (never longer than `[server] poll_timeout`)
        for work to come.

        A task whose Action or Command left the CAS fails and is left out.
        """
        worker_id = await acting_worker(self.pool, principal, worker_id)
        try:
            worker = await workers.get_worker(self.pool, worker_id)
        except NotFound:
            raise NotFound(f"worker {worker_id} is not registered; register again") from None
        limit = min(max_tasks or 1, worker.max_concurrent)
        wait = self.settings.poll_timeout.total_seconds()
        if timeout is not None:
            wait = min(wait, max(timeout.total_seconds(), 0.0))
        deadline = time.monotonic() + wait
        hops: int | None = None  # set when a NOTIFY woke this poll
        empty = 0
        while True:
            leased = await queue.lease_tasks(
                self.pool, worker_id, worker.platform, limit, self.settings.lease_duration
            )
            if hops is not None and not leased:
                # Woken for a task this worker cannot run (platform): let the next idle
                # poller try. (Each queued task sends its own NOTIFY, so a full lease
                # needs no passing on.)
                self.notifications.pass_work_on(hops)
            if leased:
                assignments = [await self._assign(t, worker_id) for t in leased]
                return PollOutcome([a for a in assignments if a is not None], empty, leased=True)
            empty += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return PollOutcome([], empty)
            hops = await self.notifications.wait_for_work(remaining)

    async def _assign(self, task: LeasedTask, worker_id: str) -> Assignment | None:
        """The task with its Action and Command; None (and the task failed) when they
        left the CAS after Execute checked them: fail this task, not the poll."""
        try:
            loaded = await load_action(self.store, task.action_digest, check_input_root=False)
        except FailedPrecondition as exc:
            error = FailedPrecondition(f"{exc}; upload the action's blobs again", exc.violations)
            response = re_pb2.ExecuteResponse(status=to_status(error), message=str(exc))
            await queue.complete_task(
                self.pool,
                task.task_id,
                task.lease_token,
                worker_id,
                succeeded=False,
                response=response.SerializeToString(),
                cache_result=None,
                detail={"error": str(exc)},
            )
            log.warning("Task %s failed before it ran: %s", task_name(task.task_id), exc)
            return None
        log.info("Leased task %s to worker %s", task_name(task.task_id), worker_id)
        return Assignment(task, loaded.action, loaded.command)
