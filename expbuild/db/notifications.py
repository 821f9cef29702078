"""LISTEN/NOTIFY fan-in for one server replica.

One dedicated connection per replica listens on two channels and wakes local waiters:
- `expbuild_task_queued`: work may be available. It wakes ONE long-polling worker of this
  replica (the longest waiting), not all of them: with many idle workers, waking all for
  each task would send them all to the database to find one task. The woken poller
  passes the wake on (`pass_work_on`) when it found nothing it could run (another
  platform's task), at most once around the pollers that were waiting when the
  notification came. Every queued task sends its own notification.
- `expbuild_task_done`: those tasks' stage changed; it wakes the clients streaming their
  operations. The payload is task ids, comma-separated ("what changed: read the task"),
  or for a lease `leased <leased_at> <id>:<queued_at>,… <worker name>` (times in
  microseconds since the epoch), which says all an EXECUTING stage shows, so streams
  need not read. A statement that leases or completes a batch sends one notification
  for all of it.

The last few thousand tasks' notifications are remembered, so a stream can start
watching a task after it queued it (`mark` before, `watching_task(..., since=mark)`)
and still learn what it missed in between without reading the task.

While the listener is connected, waiters sleep until a notification (or their own
deadline) and the database is not polled at all: a notification sent after a waiter
registered always reaches it. Only while the listener is disconnected do waits end after
`fallback_interval` so that callers re-check the database; losing the connection and
getting it back each wake every waiter once. A connection that dies silently (no FIN from
a vanished host) is caught by a cheap `SELECT 1` every `check_interval`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from expbuild.db.pool import connect

log = logging.getLogger(__name__)

QUEUED_CHANNEL = "expbuild_task_queued"
DONE_CHANNEL = "expbuild_task_done"

# Tasks whose notifications are remembered for `watching_task(since=...)`: minutes of
# traffic at hundreds of actions per second, far longer than an Execute's enqueue.
REMEMBERED_TASKS = 4096
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class TaskLeased:
    """A lease as its notification tells it."""

    worker_name: str
    queued_at: datetime
    leased_at: datetime


@dataclass(frozen=True)
class Mark:
    """A point in this replica's stream of task notifications (`Notifications.mark`)."""

    received: int  # task notifications received before it
    connection: int | None  # the listener connection then (None: none was up)


class TaskWatch:
    """What a stream following one task was told since it last looked."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.recheck = False  # something changed that no notification described: read
        self.lease: TaskLeased | None = None  # the newest lease notified

    def note(self, lease: TaskLeased | None) -> None:
        if lease is None:
            self.recheck = True
        else:
            self.lease = lease
        self.event.set()

    def take(self) -> tuple[bool, TaskLeased | None]:
        """(read the task?, the newest lease notified), and forget both."""
        taken = self.recheck, self.lease
        self.recheck, self.lease = False, None
        return taken


def parse_task_changes(payload: str) -> list[tuple[int, TaskLeased | None]]:
    """The tasks of an `expbuild_task_done` payload and, for a lease, what it says of each.
    ValueError: not a payload this server sends."""
    if not payload.startswith("leased "):
        # Ids: read the task. An id followed by words this replica does not know (another
        # version's) counts as a bare id.
        return [(int(item.partition(" ")[0]), None) for item in payload.split(",")]
    _, leased, entries, worker = payload.split(" ", 3)
    leased_at = _EPOCH + timedelta(microseconds=int(leased))
    changes: list[tuple[int, TaskLeased | None]] = []
    for entry in entries.split(","):
        task_id, queued = entry.split(":")
        queued_at = _EPOCH + timedelta(microseconds=int(queued))
        changes.append((int(task_id), TaskLeased(worker, queued_at, leased_at)))
    return changes


class Notifications:
    def __init__(
        self,
        database_url: str,
        fallback_interval: timedelta = timedelta(seconds=2),
        check_interval: timedelta = timedelta(seconds=10),
    ):
        self._url = database_url
        self.fallback_interval = fallback_interval.total_seconds()
        self.check_interval = check_interval.total_seconds()
        # Idle pollers, longest waiting first; a wake-up with nobody waiting is kept for
        # the next poller (it may have missed the notification between its lease and wait).
        self._pollers: collections.deque[asyncio.Future] = collections.deque()
        self._pending_wake = False
        self._done_waiters: dict[int, set[TaskWatch]] = defaultdict(set)
        # Recent task notifications, oldest task first: task id -> (number received, change).
        self._recent: collections.OrderedDict[int, list[tuple[int, TaskLeased | None]]] = (
            collections.OrderedDict()
        )
        self._received = 0
        self._forgotten = 0  # the newest notification number no longer remembered
        self._connection = 0  # counts connects and disconnects of the listener
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
            # Bounded: a replica's exit must not hang on its listener.
            await asyncio.wait({self._supervisor}, timeout=10)
        if self._conn is not None and not self._conn.is_closed():
            try:
                # Cancelled mid-query (the liveness probe), a graceful close can wait for
                # ever; a replica's exit must not.
                await self._conn.close(timeout=5)
            except (TimeoutError, asyncpg.PostgresError, OSError):
                self._conn.terminate()
        self._connected.clear()
        self._wake_all()  # waiters still sleeping fall back to polling

    @property
    def connected(self) -> bool:
        """Whether notifications are arriving now (else waits poll the database)."""
        return self._connected.is_set()

    async def _keep_listening(self) -> None:
        delay = 0.5
        connected_before = False
        while True:
            try:
                self._conn = await connect(self._url)
                closed = asyncio.Event()
                self._conn.add_termination_listener(lambda _conn, closed=closed: closed.set())
                await self._conn.add_listener(QUEUED_CHANNEL, self._on_queued)
                await self._conn.add_listener(DONE_CHANNEL, self._on_done)
                self._connection += 1
                self._connected.set()
                delay = 0.5
                if connected_before:
                    # Whatever happened while we were deaf: everyone re-checks once.
                    self._wake_all()
                connected_before = True
                await self._watch(self._conn, closed)
                log.warning("LISTEN connection closed; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep trying; waits fall back to polling
                log.warning("LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
            if self._conn is not None and not self._conn.is_closed():
                self._conn.terminate()
            was_connected = self.connected
            self._connection += 1
            self._connected.clear()
            if was_connected:
                # Waiters sleeping without a deadline must start polling now.
                self._wake_all()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _watch(self, conn: asyncpg.Connection, closed: asyncio.Event) -> None:
        """Return when the connection closes or stops answering."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # lands as its inner await finishes, and `stop` would then wait for ever.
        while True:
            try:
                async with asyncio.timeout(self.check_interval):
                    await closed.wait()
                return
            except TimeoutError:
                pass
            async with asyncio.timeout(self.check_interval):
                await conn.fetchval("SELECT 1")

    def _wait_seconds(self, timeout: float) -> float:
        return timeout if self.connected else min(timeout, self.fallback_interval)

    @property
    def idle_pollers(self) -> int:
        """How many long polls of this replica are waiting for a wake-up right now."""
        return sum(1 for waiter in self._pollers if not waiter.done())

    def _on_queued(self, *_args) -> None:
        # The wake may travel on through every poller waiting now, and no further.
        if not self._wake_next(hops=len(self._pollers) - 1):
            self._pending_wake = True

    def pass_work_on(self, hops: int) -> None:
        """Wake the next waiting poller if the wake that woke the caller has hops left.

        With none left, the next poller to start waiting re-checks once: it may have been
        leasing (and missed the task) while the wake went round the others."""
        if hops > 0:
            self._wake_next(hops - 1)
        else:
            self._pending_wake = True

    def _wake_next(self, hops: int) -> bool:
        while self._pollers:
            waiter = self._pollers.popleft()
            if not waiter.done():
                waiter.set_result(max(hops, 0))
                return True
        return False

    def _on_done(self, _conn, _pid, _channel, payload: str) -> None:
        try:
            changes = parse_task_changes(payload)
        except ValueError:
            return
        for task_id, lease in changes:
            self._received += 1
            self._remember(task_id, lease)
            for watch in self._done_waiters.get(task_id, ()):
                watch.note(lease)

    def _remember(self, task_id: int, lease: TaskLeased | None) -> None:
        changes = self._recent.pop(task_id, None) or []
        changes.append((self._received, lease))
        self._recent[task_id] = changes
        if len(self._recent) > REMEMBERED_TASKS:
            _, oldest = self._recent.popitem(last=False)
            self._forgotten = max(self._forgotten, oldest[-1][0])

    def mark(self) -> Mark:
        """Now, in the stream of task notifications: take it before queueing a task to
        follow it from then on with `watching_task(task_id, since=mark)`."""
        return Mark(self._received, self._connection if self.connected else None)

    def _missed(self, task_id: int, since: Mark) -> list[TaskLeased | None] | None:
        """The task's changes notified after `since`; None when they cannot be known (the
        listener was down or reconnected, or they may have been forgotten)."""
        if (
            since.connection is None
            or since.connection != self._connection
            or not self.connected
            or since.received < self._forgotten
        ):
            return None
        return [lease for n, lease in self._recent.get(task_id, ()) if n > since.received]

    def _wake_all(self) -> None:
        while self._pollers:
            waiter = self._pollers.popleft()
            if not waiter.done():
                waiter.set_result(0)
        self._pending_wake = True
        for watches in self._done_waiters.values():
            for watch in watches:
                watch.note(None)  # notifications may have been lost: read

    async def wait_for_work(self, timeout: float) -> int | None:
        """Wait until this poller is woken for new work or `timeout` passes (while the
        listener is disconnected, the fallback interval at most).

        Returns None after a plain timeout or a pending re-check, else how many further
        pollers the wake may still be passed to (`pass_work_on`).
        """
        if self._pending_wake:
            # A re-check, not a wake to pass on: it must not go round forever.
            self._pending_wake = False
            return None
        waiter = asyncio.get_running_loop().create_future()
        self._pollers.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=self._wait_seconds(timeout))
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

    @contextlib.contextmanager
    def watching_task(self, task_id: int, since: Mark | None = None) -> Iterator[TaskWatch]:
        """What changes of the task are notified from now on, and, with `since`, from that
        mark on: a change committed after the mark is then never missed, so
        `wait_for_change` may sleep without polling. When what happened since the mark
        cannot be known, the watch starts with `recheck` set (read the task)."""
        watch = TaskWatch()
        self._done_waiters[task_id].add(watch)
        try:
            if since is not None:
                missed = self._missed(task_id, since)
                for lease in [None] if missed is None else missed:
                    watch.note(lease)
            yield watch
        finally:
            waiters = self._done_waiters.get(task_id)
            if waiters is not None:
                waiters.discard(watch)
                if not waiters:
                    del self._done_waiters[task_id]

    async def wait_for_change(self, watch: TaskWatch, timeout: float) -> None:
        """Wait for a change of the watched task or `timeout`. While the listener is
        disconnected the wait lasts the fallback interval at most and then asks for a
        read (`recheck`): notifications do not arrive."""
        try:
            await asyncio.wait_for(watch.event.wait(), timeout=self._wait_seconds(timeout))
        except TimeoutError:
            if not self.connected:
                watch.recheck = True
        watch.event.clear()
