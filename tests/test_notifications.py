"""The replica's LISTEN fan-in for task changes, against a real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest

from expbuild.db import notifications as notifications_module
from expbuild.db.notifications import DONE_CHANNEL, Notifications, parse_task_changes
from tests.waiting import wait_until

LEASE = "leased 1733389202000001 7:1733389201123456 worker with spaces"


@pytest.fixture
async def notifications(database_url):
    listener = Notifications(database_url, fallback_interval=timedelta(hours=1))
    await listener.start()
    assert listener.connected
    yield listener
    await listener.stop()


async def _notify(pool, listener: Notifications, *payloads: str) -> None:
    """Send the payloads and wait until the listener has had them."""
    before = listener.mark().received
    for payload in payloads:
        await pool.execute("SELECT pg_notify($1, $2)", DONE_CHANNEL, payload)
    await wait_until(
        lambda: listener.mark().received == before + len(payloads), what="the notifications"
    )


def test_a_lease_notification_says_what_the_executing_stage_shows():
    [(task_id, lease)] = parse_task_changes(LEASE)
    assert task_id == 7 and lease is not None
    assert lease.worker_name == "worker with spaces"
    assert lease.queued_at.timestamp() * 1e6 == pytest.approx(1733389201123456, abs=1)
    assert (lease.leased_at - lease.queued_at).total_seconds() == pytest.approx(0.876545)
    batch = parse_task_changes("leased 1733389202000001 7:1733389201123456,9:1 w,1")
    assert [task_id for task_id, _ in batch] == [7, 9]
    assert {lease.worker_name for _, lease in batch if lease} == {"w,1"}
    assert parse_task_changes("7") == [(7, None)]
    assert parse_task_changes("7,8") == [(7, None), (8, None)]
    # Another version's words after an id: read the task.
    assert parse_task_changes("7 moved 1 2") == [(7, None)]
    with pytest.raises(ValueError):
        parse_task_changes("seven")


async def test_a_watch_from_a_mark_gets_what_was_notified_since(pool, notifications):
    """What Execute relies on to follow the task it queued without reading it back."""
    await _notify(pool, notifications, "7")  # before the mark: not replayed
    mark = notifications.mark()
    await _notify(pool, notifications, "8", LEASE)
    with notifications.watching_task(7, since=mark) as watch:
        assert watch.take() == (False, parse_task_changes(LEASE)[0][1])
    with notifications.watching_task(7, since=notifications.mark()) as watch:
        assert watch.take() == (False, None)  # nothing since
        await _notify(pool, notifications, "7")  # a completion: read the task
        assert watch.take() == (True, None)


async def test_a_watch_reads_when_the_notifications_since_its_mark_were_forgotten(
    pool, notifications, monkeypatch
):
    monkeypatch.setattr(notifications_module, "REMEMBERED_TASKS", 2)
    mark = notifications.mark()
    await _notify(pool, notifications, LEASE, "8", "9")  # task 7's lease is forgotten
    with notifications.watching_task(7, since=mark) as watch:
        assert watch.take() == (True, None)
    with notifications.watching_task(9, since=mark) as watch:
        assert watch.take() == (True, None)  # 7 fell out after the mark: cannot vouch


async def test_a_watch_reads_after_the_listener_reconnected(pool, notifications):
    mark = notifications.mark()
    with notifications.watching_task(7) as watching:
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%' OR query = 'SELECT 1'"
        )
        await wait_until(lambda: watching.recheck, what="the watch told to read")
    await wait_until(lambda: notifications.connected, what="the listener back")
    with notifications.watching_task(7, since=mark) as watch:
        assert watch.take() == (True, None)
