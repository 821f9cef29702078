"""Handing out leases: a worker's long poll for as many tasks as it has free slots.

A poll leases at once when it can; otherwise it waits on the replica's LISTEN wake-ups
(or the fallback interval) and tries again, until its deadline. Each leased task goes out
with its Action and Command, so the worker needs no extra round trip to start.

A poll is one statement per lease attempt: the worker's platform and slot count are read
on its first poll to this replica and kept, and the lease statement itself refuses a
worker that is no longer online (drained, offline, gone) or no longer offers that
platform. A kept entry that went stale can therefore only lease nothing; it is dropped
when a poll ends empty and when the worker registers or deregisters through this replica.
It also holds the worker's credential, so that with auth on a poll does not look it up.
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
from expbuild.db.workers import WorkerRecord
from expbuild.errors import FailedPrecondition, NotFound
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.status import to_status
from expbuild.scheduling.actions import load_action
from expbuild.scheduling.task_names import task_name
from expbuild.scheduling.workers import acting_worker

log = logging.getLogger(__name__)

# Far more workers than one replica serves; past it the cache starts over.
MAX_KEPT_WORKERS = 10_000


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
        self._workers: dict[str, WorkerRecord] = {}  # see the module's docstring

    def forget_worker(self, worker_id: str) -> None:
        """Read the worker again on its next poll (it registered or left)."""
        self._workers.pop(worker_id, None)

    async def _worker(self, worker_id: str) -> WorkerRecord:
        worker = self._workers.get(worker_id)
        if worker is None:
            try:
                worker = await workers.get_worker(self.pool, worker_id)
            except NotFound:
                raise NotFound(f"worker {worker_id} is not registered; register again") from None
            if len(self._workers) >= MAX_KEPT_WORKERS:
                self._workers.clear()
            self._workers[worker_id] = worker
        return worker

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
        worker = self._workers.get(worker_id)
        # An id's credential never changes (register_worker refuses another): a kept
        # record answers acting_worker's question too.
        if worker is None or (principal.authenticated and worker.principal != principal.name):
            worker_id = await acting_worker(self.pool, principal, worker_id)
            worker = await self._worker(worker_id)
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
                # Nothing leased all poll: maybe the kept worker record went stale.
                self.forget_worker(worker_id)
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
