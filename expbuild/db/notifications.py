"""LISTEN/NOTIFY fan-in for one server replica.

One dedicated connection per replica listens on two channels and wakes local waiters:
- `expbuild_task_queued`: work may be available. It wakes ONE long-polling worker of this
  replica (the longest waiting), not all of them: with many idle workers, waking all for
  each task would send them all to the database to find one task. The woken poller
  passes the wake on (`pass_work_on`) when it found nothing it could run (another
  platform's task), at most once around the pollers that were waiting when the
  notification came. Every queued task sends its own notification.
- `expbuild_task_done` (payload: task id): clients streaming that task's operations.

NOTIFY is an optimisation, never the only path: every wait also ends after
`fallback_interval`, and callers re-check the database, so a dropped listener
connection or a lost notification only costs latency. While disconnected, the listener
reconnects in the background.
"""

from __future__ import annotations

import asyncio
import collections
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
        # Idle pollers, longest waiting first; a wake-up with nobody waiting is kept for
        # the next poller (it may have missed the notification between its lease and wait).
        self._pollers: collections.deque[asyncio.Future] = collections.deque()
        self._pending_wake = False
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

    @property
    def idle_pollers(self) -> int:
        """How many long polls of this replica are waiting for a wake-up right now."""
        return sum(1 for waiter in self._pollers if not waiter.done())

    def _on_queued(self, *_args) -> None:
        # The wake may travel on through every poller waiting now, and no further.
        if not self._wake_next(hops=len(self._pollers) - 1):
            self._pending_wake = True

    def pass_work_on(self, hops: int) -> None:
        """Wake the next waiting poller if the wake that woke the caller has hops left."""
        if hops > 0:
            self._wake_next(hops - 1)

    def _wake_next(self, hops: int) -> bool:
        while self._pollers:
            waiter = self._pollers.popleft()
            if not waiter.done():
                waiter.set_result(max(hops, 0))
                return True
        return False

    def _on_done(self, _conn, _pid, _channel, payload: str) -> None:
        try:
            task_id = int(payload)
        except ValueError:
            return
        for event in self._done_waiters.get(task_id, ()):
            event.set()

    def _wake_all(self) -> None:
        while self._pollers:
            waiter = self._pollers.popleft()
            if not waiter.done():
                waiter.set_result(0)
        self._pending_wake = True
        for events in self._done_waiters.values():
            for event in events:
                event.set()

    async def wait_for_work(self, timeout: float) -> int | None:
        """Wait until this poller is woken for new work, or min(timeout, fallback interval).

        Returns None after a plain timeout, else how many further pollers the wake may
        still be passed to (`pass_work_on`).
        """
        if self._pending_wake:
            self._pending_wake = False
            return 0
        waiter = asyncio.get_running_loop().create_future()
        self._pollers.append(waiter)
        try:
            await asyncio.wait_for(
                asyncio.shield(waiter), timeout=min(timeout, self.fallback_interval)
            )
        except TimeoutError:
            pass
        finally:
            with contextlib.suppress(ValueError):
                self._pollers.remove(waiter)
        # A wake that raced with the timeout still counts: the caller leases either way.
        if waiter.done() and not waiter.cancelled():
            return waiter.result()
        waiter.cancel()
        return None

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
