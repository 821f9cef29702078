"""Worker sessions: noticing in seconds that a worker died.

A running worker holds one `OpenSession` stream open, to whichever replica it reaches. A
worker process that dies (kill -9, OOM, a crashed host's kernel closing its sockets) breaks
that stream; the replica that held it records the loss in Postgres (the database's clock:
`workers.disconnected_at`). Unless the worker opens a new session (on any replica) or
heartbeats within `[server] worker_disconnect_grace`, it is marked offline and the reaper
requeues its leases. A worker that leaves properly deregisters first, and a replica that
shuts down records nothing: its workers are alive and reconnect elsewhere. The heartbeat
timeout stays the fallback for a host that vanishes without closing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import asyncpg

from expbuild.db import workers

log = logging.getLogger(__name__)


class WorkerSessions:
    """The sessions held by this replica."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        grace: timedelta,
        requeue_lost: Callable[[], Awaitable[None]],
    ):
        self.pool = pool
        self.grace = grace
        # Runs one reaper pass; called once the grace of a lost session has passed.
        self._requeue_lost = requeue_lost
        self._closing = asyncio.Event()
        self._followups: set[asyncio.Task] = set()
        self.held = 0  # sessions open on this replica now

    async def hold(self, worker_id: str) -> AsyncIterator[None]:
        """Open a session for `worker_id`; yields once it is recorded, then stays open until
        the caller goes away (the stream broke) or this replica closes (`close`)."""
        session_id = uuid.uuid4()
        await workers.open_session(self.pool, worker_id, session_id)
        log.info("Worker %s opened a session", worker_id)
        self.held += 1
        ended_by_server = False
        try:
            yield
            await self._closing.wait()
            ended_by_server = True
        finally:
            self.held -= 1
            if not ended_by_server and not self._closing.is_set():
                # The worker went away (cancellation of this call): record it in a task of
                # its own, as this one is being cancelled.
                followup = asyncio.create_task(
                    self._lost(worker_id, session_id), name=f"session-lost {worker_id}"
                )
                self._followups.add(followup)
                followup.add_done_callback(self._followups.discard)

    async def _lost(self, worker_id: str, session_id: uuid.UUID) -> None:
        try:
            if not await workers.close_session(self.pool, worker_id, session_id):
                return  # deregistered, or already reconnected
            log.warning(
                "Worker %s: session broke without a goodbye; its tasks are requeued unless "
                "it reconnects within %gs",
                worker_id,
                self.grace.total_seconds(),
            )
            # A little past the grace, so the database's clock agrees it has passed.
            await asyncio.sleep(self.grace.total_seconds() + 0.2)
            await self._requeue_lost()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the regular reaper pass catches up
            log.warning("Worker %s: recording the lost session failed: %s", worker_id, exc)

    async def close(self) -> None:
        """This replica is shutting down: end every session without recording a loss."""
        self._closing.set()
        for followup in list(self._followups):
            followup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await followup
