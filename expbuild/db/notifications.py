"""LISTEN/NOTIFY fan-in for one server replica.

One dedicated connection per replica listens on two channels and wakes local waiters:
- `expbuild_task_queued`: work may be available; long-polling workers try to lease.
- `expbuild_task_done` (payload: task id): clients streaming that task's operations.

NOTIFY is an optimisation, never the only path: every wait also ends after
`fallback_interval`, and callers re-check the database, so a dropped listener
connection or a lost notification only costs latency. While disconnected, the listener
reconnects in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from datetime import timedelta

import asyncpg

from expbuild.db.pool import connect

log = logging.getLogger(__name__)

QUEUED_CHANNEL = "expbuild_task_queued"
DONE_CHANNEL = "expbuild_task_done"


class Notifications:
    def __init__(self, database_url: str, fallback_interval: timedelta = timedelta(seconds=2)):
        self._url = database_url
        self.fallback_interval = fallback_interval.total_seconds()
        self._work_available = asyncio.Event()
        self._done_waiters: dict[int, set[asyncio.Event]] = defaultdict(set)
        self._conn: asyncpg.Connection | None = None
        self._supervisor: asyncio.Task | None = None
        self._connected = asyncio.Event()

    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._keep_listening(), name="notifications")
        # Do not block start-up forever; waits fall back to polling until connected.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout=10)

    async def stop(self) -> None:
        if self._supervisor:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()

    async def _keep_listening(self) -> None:
        delay = 0.5
        while True:
            try:
                self._conn = await connect(self._url)
                await self._conn.add_listener(QUEUED_CHANNEL, self._on_queued)
                await self._conn.add_listener(DONE_CHANNEL, self._on_done)
                self._connected.set()
                delay = 0.5
                closed = asyncio.Event()
                self._conn.add_termination_listener(lambda _conn, closed=closed: closed.set())
                await closed.wait()
                log.warning("LISTEN connection closed; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep trying; waits fall back to polling
                log.warning("LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
            self._connected.clear()
            # Anything may have happened while we were deaf: wake everyone to re-check.
            self._wake_all()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _on_queued(self, *_args) -> None:
        self._work_available.set()

    def _on_done(self, _conn, _pid, _channel, payload: str) -> None:
        try:
            task_id = int(payload)
        except ValueError:
            return
        for event in self._done_waiters.get(task_id, ()):
            event.set()

    def _wake_all(self) -> None:
        self._work_available.set()
        for events in self._done_waiters.values():
            for event in events:
                event.set()

    async def wait_for_work(self, timeout: float) -> None:
        """Return when work may have been queued, or after min(timeout, fallback interval)."""
        event = self._work_available
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=min(timeout, self.fallback_interval))
        # Everyone waiting now has been woken; the next waiters wait for the next NOTIFY.
        if event.is_set():
            self._work_available = asyncio.Event()

    async def wait_for_task_done(self, task_id: int, timeout: float) -> None:
        """Return when the task may have finished, or after min(timeout, fallback interval)."""
        event = asyncio.Event()
        self._done_waiters[task_id].add(event)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(timeout, self.fallback_interval))
        finally:
            waiters = self._done_waiters.get(task_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._done_waiters[task_id]
