"""Coalescing CompleteTask calls: concurrent completions share one statement and commit.

Each completion is otherwise a round trip and a commit of its own (`complete_task`), and
under load the commits are what PostgreSQL spends its time on. A replica's batcher sends
the first completion at once; those arriving while that statement is in flight wait for
it and go together in the next `complete_tasks` (no timer: a lone completion is never
delayed). Each caller still gets its own outcome: a stale lease is refused for that
completion alone, with the same `Aborted` reason `complete_task` gives.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from expbuild.db import queue
from expbuild.db.pool import Database

log = logging.getLogger(__name__)

# Bounds one statement's arrays; more waiting completions go in the next.
MAX_BATCH = 256
# A batch locks several task rows, so it may deadlock with a heartbeat extending the same
# worker's leases; PostgreSQL then aborts one statement, and it is simply run again.
_DEADLOCK_RETRIES = 3

_Waiting = tuple[queue.Completion, "asyncio.Future[queue.CompletedTask]"]


class CompletionBatcher:
    """One per replica: `complete` is `queue.complete_task`, batched with its neighbours."""

    def __init__(self, db: Database):
        self._db = db
        self._waiting: list[_Waiting] = []
        self._sender: asyncio.Task[None] | None = None
        self.statements = 0  # statements sent: how much coalescing happened

    @property
    def waiting(self) -> int:
        """Completions waiting for the statement in flight to end."""
        return sum(1 for _, done in self._waiting if not done.done())

    async def complete(self, completion: queue.Completion) -> queue.CompletedTask:
        """Apply the completion under its lease; raises what `complete_task` would."""
        queue.check_lease_token(completion.lease_token, completion.task_id)  # never fails others
        done: asyncio.Future[queue.CompletedTask] = asyncio.get_running_loop().create_future()
        self._waiting.append((completion, done))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_all(), name="complete-tasks")
        return await done

    def _next_batch(self) -> list[_Waiting]:
        """The waiting completions whose caller still waits, one per task (a second one
        for a task, a worker's retry, waits for the next batch and gets its own answer)."""
        batch: list[_Waiting] = []
        later: list[_Waiting] = []
        tasks: set[int] = set()
        for item in self._waiting:
            completion, done = item
            if done.done():
                continue  # the caller gave up (its call was cancelled) before it was sent
            if completion.task_id in tasks or len(batch) >= MAX_BATCH:
                later.append(item)
            else:
                tasks.add(completion.task_id)
                batch.append(item)
        self._waiting = later
        return batch

    async def _send_all(self) -> None:
        while self._waiting:
            batch = self._next_batch()
            if not batch:
                continue
            try:
                outcomes = await self._send([c for c, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch hears of it
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), outcome in zip(batch, outcomes, strict=True):
                if done.done():
                    continue
                if isinstance(outcome, Exception):
                    done.set_exception(outcome)
                else:
                    done.set_result(outcome)

    async def _send(
        self, completions: list[queue.Completion]
    ) -> list[queue.CompletedTask | Exception]:
        for attempt in range(1, _DEADLOCK_RETRIES + 1):
            self.statements += 1
            try:
                return await queue.complete_each(self._db, completions)
            except asyncpg.DeadlockDetectedError:
                if attempt == _DEADLOCK_RETRIES:
                    raise
                log.info("Completing %d task(s) met a deadlock; trying again", len(completions))
        raise AssertionError("unreachable")
