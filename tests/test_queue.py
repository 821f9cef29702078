"""Queue semantics against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import timedelta

import asyncpg
import pytest

from expbuild.db import assets, queue, workers
from expbuild.db import operations as db_operations
from expbuild.db.notifications import DONE_CHANNEL, Notifications, parse_task_changes
from expbuild.digest import digest_of
from expbuild.errors import Aborted, InvalidArgument
from tests.waiting import wait_until

LINUX = {"OSFamily": ["Linux"], "Arch": ["x86_64"]}
LEASE = timedelta(minutes=5)


def task(n: int | str, **kwargs) -> queue.NewTask:
    kwargs.setdefault("platform", {"OSFamily": ["Linux"]})
    return queue.NewTask(
        instance_name="", action_digest=digest_of(f"action {n}".encode()), **kwargs
    )


async def worker(pool, name="w", platform=LINUX, slots=4) -> str:
    return await workers.register_worker(
        pool, worker_id="", name=name, hostname="host", platform=platform, max_concurrent=slots
    )


async def complete(pool, leased, worker_id, *, response=b"", cache_result=None):
    """Complete a leased task successfully under its own lease."""
    await queue.complete_task(
        pool,
        leased.task_id,
        leased.lease_token,
        worker_id,
        succeeded=True,
        response=response,
        cache_result=cache_result,
    )


async def events(pool, task_id):
    rows = await pool.fetch("SELECT event FROM task_events WHERE task_id = $1 ORDER BY id", task_id)
    return [r["event"] for r in rows]


async def test_enqueue_then_lease_hands_out_a_fresh_token(pool):
    w = await worker(pool)
    queued = await queue.enqueue(pool, task(1), "op-1")
    assert queued.is_new
    [leased] = await queue.lease_tasks(pool, w, LINUX, 4, LEASE)
    assert leased.task_id == queued.task_id
    assert leased.attempt == 1
    uuid.UUID(leased.lease_token)
    assert await queue.lease_tasks(pool, w, LINUX, 4, LEASE) == []
    assert await events(pool, queued.task_id) == ["queued", "leased"]


async def test_identical_cacheable_actions_share_one_task(pool):
    first = await queue.enqueue(pool, task(1), "op-1")
    second = await queue.enqueue(pool, task(1), "op-2")
    assert second.task_id == first.task_id and not second.is_new
    ops = await pool.fetch(
        "SELECT name FROM operations WHERE task_id = $1 ORDER BY name", first.task_id
    )
    assert [r["name"] for r in ops] == ["op-1", "op-2"]


async def test_do_not_cache_actions_are_never_merged(pool):
    first = await queue.enqueue(pool, task(1, do_not_cache=True), "op-1")
    second = await queue.enqueue(pool, task(1, do_not_cache=True), "op-2")
    assert first.task_id != second.task_id


async def test_finished_action_runs_again_when_enqueued_again(pool):
    w = await worker(pool)
    first = await queue.enqueue(pool, task(1), "op-1")
    [leased] = await queue.lease_tasks(pool, w, LINUX, 1, LEASE)
    await complete(pool, leased, w, response=b"r")
    again = await queue.enqueue(pool, task(1), "op-2")
    assert again.is_new and again.task_id != first.task_id


async def test_lease_takes_up_to_n_in_priority_then_age_order(pool):
    w = await worker(pool)
    ids = {}
    for n, prio in [(1, 5), (2, 0), (3, 5), (4, -1), (5, 0)]:
        ids[n] = (await queue.enqueue(pool, task(n, priority=prio), f"op-{n}")).task_id
    leased = await queue.lease_tasks(pool, w, LINUX, 3, LEASE)
    assert [t.task_id for t in leased] == [ids[4], ids[2], ids[5]]
    rest = await queue.lease_tasks(pool, w, LINUX, 10, LEASE)
    assert [t.task_id for t in rest] == [ids[1], ids[3]]
    assert len({t.lease_token for t in leased + rest}) == 5


async def test_platform_matching_is_containment(pool):
    mac = await worker(pool, "mac", {"OSFamily": ["Darwin"]})
    multi = await worker(pool, "multi", {"OSFamily": ["Linux"], "ISA": ["x86-64", "x86-64-v3"]})
    needs_v3 = await queue.enqueue(
        pool, task("v3", platform={"OSFamily": "Linux", "ISA": "x86-64-v3"}), "a"
    )
    needs_gpu = await queue.enqueue(
        pool, task("gpu", platform={"OSFamily": "Linux", "gpu": "1"}), "b"
    )
    anything = await queue.enqueue(pool, task("any", platform={}), "c")
    assert [
        t.task_id for t in await queue.lease_tasks(pool, mac, {"OSFamily": ["Darwin"]}, 10, LEASE)
    ] == [anything.task_id]
    got = await queue.lease_tasks(
        pool, multi, {"OSFamily": ["Linux"], "ISA": ["x86-64", "x86-64-v3"]}, 10, LEASE
    )
    assert [t.task_id for t in got] == [needs_v3.task_id]
    state = await pool.fetchval("SELECT state FROM tasks WHERE id = $1", needs_gpu.task_id)
    assert state == "queued"


async def test_lease_merges_the_queues_of_every_offered_platform_in_order(pool):
    """Each platform is its own queue; a worker offering several takes from all of them
    in (priority, place in line, id) order, as from one queue."""
    w = await worker(pool, "multi", {"OSFamily": ["Linux"], "ISA": ["a", "b"]})
    offered = {"OSFamily": ["Linux"], "ISA": ["a", "b"]}
    ids = {}
    for n, platform, prio in [
        (1, {"OSFamily": "Linux", "ISA": "a"}, 0),
        (2, {"OSFamily": "Linux", "ISA": "b"}, -1),
        (3, {"OSFamily": "Linux"}, 0),
        (4, {"OSFamily": "Linux", "ISA": "a"}, -1),
        (5, {"OSFamily": "Darwin"}, -5),
    ]:
        queued = await queue.enqueue(pool, task(n, platform=platform, priority=prio), f"op-{n}")
        ids[n] = queued.task_id
    first = await queue.lease_tasks(pool, w, offered, 3, LEASE)
    assert [t.task_id for t in first] == [ids[2], ids[4], ids[1]]
    rest = await queue.lease_tasks(pool, w, offered, 10, LEASE)
    assert [t.task_id for t in rest] == [ids[3]]
    state = await pool.fetchval("SELECT state FROM tasks WHERE id = $1", ids[5])
    assert state == "queued"


async def test_lease_reads_no_queue_of_a_platform_the_worker_lacks(pool):
    """A queue of 2,000 tasks this worker cannot run, queued ahead of its own, costs its
    lease almost nothing: walking them (the single queue of old) reads a page per task."""
    w = await worker(pool)

    async def pages_read_by_one_lease() -> int:
        await queue.enqueue(pool, task(f"mine {uuid.uuid4()}"), str(uuid.uuid4()))
        await pool.execute("ANALYZE tasks")
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            plan = await conn.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queue.lease_statement(8),
                w,
                LINUX,
                LEASE,
            )
            await transaction.rollback()  # EXPLAIN ANALYZE really leases; undo it
        tx_plan = json.loads(plan)[0]["Plan"]
        return tx_plan["Shared Hit Blocks"] + tx_plan.get("Shared Read Blocks", 0)

    alone = await pages_read_by_one_lease()
    await pool.execute(
        """INSERT INTO tasks (instance_name, action_digest, platform, platform_id)
           SELECT '', 'other-' || n, '{"OSFamily": ["Darwin"]}', 999999
           FROM generate_series(1, 2000) n"""
    )
    crowded = await pages_read_by_one_lease()
    assert crowded < alone + 50, (alone, crowded)


async def test_lease_runs_a_cached_plan_that_walks_only_its_queue(pool):
    """After a few leases PostgreSQL runs lease_tasks from its cached generic plan instead
    of planning each call (a fixed ~0.2 ms of CPU per lease), and that plan too reads only
    the worker's own queue: 2,000 tasks of another platform queued ahead cost it nothing."""
    w = await worker(pool)
    await pool.execute(
        """INSERT INTO tasks (instance_name, action_digest, platform, platform_id)
           SELECT '', 'other-' || n, '{"OSFamily": ["Darwin"]}', 999999
           FROM generate_series(1, 2000) n"""
    )
    for n in range(40):
        await queue.enqueue(pool, task(f"mine {n}"), f"op-{n}")
    await pool.execute("ANALYZE tasks")
    async with pool.acquire() as conn:
        for _ in range(8):
            await queue.lease_tasks(conn, w, LINUX, 2, LEASE)
        plans = await conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
            queue.lease_statement(2),
        )
        assert plans["generic_plans"] >= 1, dict(plans)

        # The generic plan itself, as EXECUTE runs it: a few pages, not one per task.
        await conn.execute(
            f"PREPARE lease_generic (text, jsonb, interval) AS {queue.lease_statement(2)}"
        )
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        plan = await conn.fetchval(  # EXPLAIN EXECUTE takes literals only
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "
            f"EXECUTE lease_generic('{w}', '{json.dumps(LINUX)}', '5 minutes')"
        )
        await transaction.rollback()
        await conn.execute("DEALLOCATE lease_generic")
    root = json.loads(plan)[0]["Plan"]
    assert root["Actual Rows"] == 2
    assert root["Shared Hit Blocks"] + root.get("Shared Read Blocks", 0) < 100, root


async def test_completions_one_at_a_time_run_a_cached_plan(pool):
    """A completion of one task (the CompletionBatcher's usual batch) runs complete_tasks
    from the cached generic plan, not planned afresh each call (~0.2 ms of CPU)."""
    w = await worker(pool, slots=1)
    for n in range(10):
        await queue.enqueue(pool, task(n), f"op-{n}")
    await pool.execute(  # a table of some size, as the planner's estimates see it
        """INSERT INTO tasks (instance_name, action_digest, state, completed_at)
           SELECT '', 'done-' || n, 'completed', now() FROM generate_series(1, 5000) n"""
    )
    await pool.execute("ANALYZE tasks")
    async with pool.acquire() as conn:
        for _ in range(8):
            [leased] = await queue.lease_tasks(conn, w, LINUX, 1, LEASE)
            await queue.complete_tasks(
                conn, w, [queue.Completion(leased.task_id, leased.lease_token, True, b"")]
            )
        plans = await conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
            queue.complete_statement(1),
        )
    assert plans["generic_plans"] >= 1, dict(plans)


async def test_a_batch_completion_reads_its_tasks_not_every_lease(pool):
    """complete_tasks' cached generic plan finds each task by its primary key: with
    statistics taken before anything was leased, other workers' 300 leases are not read
    (a plan through tasks_leased_idx compared every element with every lease)."""
    w = await worker(pool, slots=8)
    other = await worker(pool, name="other", slots=300)
    for n in range(308):
        await queue.enqueue(pool, task(n), f"op-{n}")
    await pool.execute(  # a table of some size, as the planner's estimates see it
        """INSERT INTO tasks (instance_name, action_digest, state, completed_at)
           SELECT '', 'done-' || n, 'completed', now() FROM generate_series(1, 5000) n"""
    )
    await pool.execute("ANALYZE tasks")  # nothing leased yet, as at start-up
    await queue.lease_tasks(pool, other, LINUX, 300, LEASE)
    leased = await queue.lease_tasks(pool, w, LINUX, 8, LEASE)
    statement = queue.complete_statement(len(leased))
    async with pool.acquire() as conn:
        await conn.execute(
            "PREPARE complete_generic (bigint[], uuid[], text[], text[], bytea[], bytea[],"
            f" jsonb[]) AS {statement}"
        )
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        ids = ",".join(str(t.task_id) for t in leased)
        tokens = ",".join(f"'{t.lease_token}'" for t in leased)
        plan = await conn.fetchval(  # EXPLAIN EXECUTE takes literals only
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE complete_generic("
            f"ARRAY[{ids}], ARRAY[{tokens}]::uuid[], array_fill('{w}'::text, ARRAY[8]),"
            " array_fill('completed'::text, ARRAY[8]), array_fill(''::bytea, ARRAY[8]),"
            " array_fill(NULL::bytea, ARRAY[8]), array_fill(NULL::jsonb, ARRAY[8]))"
        )
        await transaction.rollback()
        await conn.execute("DEALLOCATE complete_generic")

    def scans(node):
        yield node
        for child in node.get("Plans", []):
            yield from scans(child)

    nodes = list(scans(json.loads(plan)[0]["Plan"]))
    task_scans = [
        n for n in nodes if n.get("Relation Name") == "tasks" and n["Node Type"] != "ModifyTable"
    ]
    assert [n.get("Index Name") for n in task_scans] == ["tasks_pkey"], task_scans
    assert sum(n["Actual Rows"] * n["Actual Loops"] for n in task_scans) == 8, task_scans


async def test_completions_of_one_worker_in_one_statement(pool):
    w = await worker(pool)
    ids = [(await queue.enqueue(pool, task(n), f"op-{n}")).task_id for n in range(4)]
    leased = await queue.lease_tasks(pool, w, LINUX, 4, LEASE)
    stale = leased[3]
    await queue.release_task(pool, stale.task_id, stale.lease_token, w, "test")
    results = await queue.complete_tasks(
        pool,
        w,
        [
            queue.Completion(leased[0].task_id, leased[0].lease_token, True, b"r0", b"ar0"),
            queue.Completion(leased[1].task_id, leased[1].lease_token, False, b"r1", None),
            queue.Completion(leased[2].task_id, leased[2].lease_token, True, b"r2", None),
            queue.Completion(stale.task_id, stale.lease_token, True, b"r3", b"ar3"),
        ],
    )
    applied = [results[t.task_id] for t in leased[:3]]
    for done in applied:  # complete_task's durations, for the metrics histograms
        assert isinstance(done, queue.CompletedTask)
        assert done.waited_seconds >= 0 and done.ran_seconds >= 0
        assert done.platform == {"OSFamily": ["Linux"]}
    assert isinstance(results[stale.task_id], Aborted)
    states = [(await queue.get_task(pool, i)).state for i in ids]
    assert states == ["completed", "failed", "completed", "queued"]
    assert (await queue.get_task(pool, ids[1])).result == b"r1"
    cached = await pool.fetch("SELECT result FROM action_cache ORDER BY result")
    assert [r["result"] for r in cached] == [b"ar0"]
    assert await events(pool, ids[0]) == ["queued", "leased", "completed"]
    assert await events(pool, ids[1]) == ["queued", "leased", "failed"]
    assert await events(pool, ids[3]) == ["queued", "leased", "released"]
    details = await pool.fetch(
        "SELECT detail FROM task_events WHERE event IN ('completed', 'failed') ORDER BY id"
    )
    assert [r["detail"] for r in details] == [{}, {}, {}]  # no detail given: an empty one


async def test_a_batch_is_one_notification_and_wakes_every_stream_of_it(pool, database_url):
    """Leasing or completing several tasks in one statement sends one NOTIFY naming all of
    them, and the replica's listener wakes the clients streaming each one."""
    w = await worker(pool)
    ids = [(await queue.enqueue(pool, task(n), f"op-{n}")).task_id for n in range(3)]
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(
        DONE_CHANNEL,
        lambda _conn, _pid, _channel, payload: heard.append(payload),
    )
    notifications = Notifications(database_url)
    await notifications.start()
    try:

        async def hear(count: int) -> list[set[int]]:
            await wait_until(lambda: len(heard) >= count, what=f"{count} notification(s)")
            return [{task_id for task_id, _ in parse_task_changes(p)} for p in heard]

        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(notifications.watching_task(i)) for i in ids]
            leased = await queue.lease_tasks(pool, w, LINUX, 4, LEASE)
            assert await hear(1) == [set(ids)]
            async with asyncio.timeout(10):
                for stream in streams:
                    await stream.event.wait()
                    stream.event.clear()
            # The lease's one notification told each stream who runs its task.
            for stream in streams:
                recheck, lease = stream.take()
                assert not recheck and lease is not None and lease.worker_name == "w"
            await queue.complete_tasks(
                pool, w, [queue.Completion(t.task_id, t.lease_token, True, b"") for t in leased]
            )
            assert (await hear(2))[1] == set(ids)
            async with asyncio.timeout(10):
                for stream in streams:
                    await stream.event.wait()
            assert all(stream.take() == (True, None) for stream in streams)  # done: read
        assert await queue.lease_tasks(pool, w, LINUX, 4, LEASE) == []
        await listener.execute("SELECT 1")  # a notification of that lease would be here now
        assert len(heard) == 2, heard
    finally:
        await notifications.stop()
        await listener.close()


async def test_completion_with_current_token_caches_and_records(pool):
    w = await worker(pool)
    queued = await queue.enqueue(pool, task(1), "op-1")
    [leased] = await queue.lease_tasks(pool, w, LINUX, 1, LEASE)
    await complete(pool, leased, w, response=b"resp", cache_result=b"ar")
    record = await queue.get_task(pool, queued.task_id)
    assert record.state == "completed" and record.result == b"resp"
    cached = await pool.fetchval(
        "SELECT result FROM action_cache WHERE action_digest = $1", str(leased.action_digest)
    )
    assert cached == b"ar"
    assert await events(pool, queued.task_id) == ["queued", "leased", "completed"]


async def test_stale_token_is_refused_and_changes_nothing(pool):
    w1, w2 = await worker(pool, "one"), await worker(pool, "two")
    queued = await queue.enqueue(pool, task(1), "op-1")
    [first] = await queue.lease_tasks(pool, w1, LINUX, 1, LEASE)
    await pool.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second'")
    assert [r.state for r in await queue.reap_expired_leases(pool)] == ["queued"]
    [second] = await queue.lease_tasks(pool, w2, LINUX, 1, LEASE)
    assert second.lease_token != first.lease_token and second.attempt == 2

    with pytest.raises(Aborted, match="leased to worker"):
        await complete(pool, first, w1, response=b"late", cache_result=b"late")
    record = await queue.get_task(pool, queued.task_id)
    assert record.state == "leased" and record.worker_id == w2 and record.result is None
    assert await pool.fetchval("SELECT count(*) FROM action_cache") == 0

    await complete(pool, second, w2, response=b"ok")
    with pytest.raises(Aborted, match="already completed"):
        await complete(pool, second, w2, response=b"twice")
    assert (await queue.get_task(pool, queued.task_id)).result == b"ok"


async def test_malformed_token_is_invalid_argument(pool):
    w = await worker(pool)
    await queue.enqueue(pool, task(1), "op")
    [leased] = await queue.lease_tasks(pool, w, LINUX, 1, LEASE)
    with pytest.raises(InvalidArgument, match="not a UUID"):
        await queue.complete_task(
            pool, leased.task_id, "nope", w, succeeded=True, response=b"", cache_result=None
        )


async def test_reaper_requeues_then_fails_after_max_attempts(pool):
    w = await worker(pool)
    queued = await queue.enqueue(pool, task(1, max_attempts=2), "op-1")
    for attempt in (1, 2):
        [leased] = await queue.lease_tasks(pool, w, LINUX, 1, LEASE)
        assert leased.attempt == attempt
        await pool.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second'")
        [reaped] = await queue.reap_expired_leases(pool)
        assert reaped.reason == "lease-expired"
    assert reaped.state == "failed"
    record = await queue.get_task(pool, queued.task_id)
    assert record.state == "failed" and record.error_code == 14
    assert "failed after 2 attempts" in record.error
    assert await events(pool, queued.task_id) == [
        "queued",
        "leased",
        "lease-expired",
        "requeued",
        "leased",
        "lease-expired",
        "failed",
    ]
    assert await queue.reap_expired_leases(pool) == []


async def test_reaper_requeues_tasks_of_silent_workers(pool):
    w = await worker(pool)
    await queue.enqueue(pool, task(1), "op-1")
    await queue.lease_tasks(pool, w, LINUX, 1, LEASE)
    await pool.execute("UPDATE workers SET last_heartbeat_at = now() - interval '10 minutes'")
    assert await workers.mark_silent_workers_offline(pool, timedelta(seconds=90)) == [w]
    [reaped] = await queue.reap_expired_leases(pool)
    assert reaped.reason == "heartbeat-missed" and reaped.state == "queued"


async def test_heartbeat_extends_leases_with_hot_updates_and_reports_fates(pool):
    w = await worker(pool)
    for n in range(3):
        await queue.enqueue(pool, task(n), f"op-{n}")
    a, b, c = await queue.lease_tasks(pool, w, LINUX, 3, LEASE)
    assert await db_operations.cancel_operation(pool, "op-1")  # b's task, which keeps running
    await queue.complete_task(
        pool, c.task_id, c.lease_token, w, succeeded=True, response=b"", cache_result=None
    )
    before = await pool.fetchval("SELECT lease_expires_at FROM tasks WHERE id = $1", a.task_id)
    hot_before = await _hot_updates(pool)

    rounds = 50
    for _ in range(rounds):
        outcome = await workers.heartbeat(
            pool,
            w,
            [(a.task_id, a.lease_token), (b.task_id, b.lease_token), (c.task_id, c.lease_token)],
            timedelta(minutes=10),
        )
    assert outcome.known and outcome.running == [a.task_id]
    assert outcome.cancelled == [b.task_id] and outcome.lost == [c.task_id]
    after = await pool.fetchval("SELECT lease_expires_at FROM tasks WHERE id = $1", a.task_id)
    assert after > before
    updates, hot = await _hot_updates(pool, hot_before)
    assert updates >= rounds and hot / updates > 0.9, (updates, hot)


async def _hot_updates(pool, baseline=(0, 0)):
    await pool.execute("SELECT pg_stat_force_next_flush()")
    row = await pool.fetchrow(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'tasks'"
    )
    return row["n_tup_upd"] - baseline[0], row["n_tup_hot_upd"] - baseline[1]


async def test_heartbeat_of_unknown_worker_asks_it_to_register(pool):
    outcome = await workers.heartbeat(pool, "worker-nobody", [], LEASE)
    assert not outcome.known


async def test_release_requeues_at_once_without_counting_the_attempt(pool):
    w = await worker(pool)
    queued = await queue.enqueue(pool, task(1), "op")
    [leased] = await queue.lease_tasks(pool, w, LINUX, 1, LEASE)
    await queue.release_task(pool, leased.task_id, leased.lease_token, w, "shutdown")
    [again] = await queue.lease_tasks(pool, w, LINUX, 1, LEASE)
    assert again.task_id == queued.task_id and again.attempt == 1


async def test_deregister_requeues_the_workers_leases(pool):
    w = await worker(pool)
    await queue.enqueue(pool, task(1), "op")
    await queue.lease_tasks(pool, w, LINUX, 1, LEASE)
    assert await workers.deregister_worker(pool, w) == 1
    assert await pool.fetchval("SELECT state FROM tasks") == "queued"


async def test_concurrent_leasers_never_share_a_task_and_lose_none(pool):
    total, leasers = 400, 8
    for n in range(total):
        await queue.enqueue(pool, task(n), f"op-{n}")
    ids = [await worker(pool, f"w{i}") for i in range(leasers)]
    seen: list[int] = []

    async def run(worker_id: str) -> None:
        while True:
            got = await queue.lease_tasks(pool, worker_id, LINUX, 7, LEASE)
            if not got:
                return
            seen.extend(t.task_id for t in got)
            for t in got:
                await complete(pool, t, worker_id)

    await asyncio.gather(*(run(w) for w in ids))
    assert len(seen) == total and len(set(seen)) == total
    assert await pool.fetchval("SELECT count(*) FROM tasks WHERE state = 'completed'") == total
    leases = await pool.fetchval("SELECT count(*) FROM task_events WHERE event = 'leased'")
    assert leases == total


async def test_finished_tasks_past_retention_are_purged_but_their_history_stays(pool):
    w = await worker(pool)
    queued = await queue.enqueue(pool, task(1), "op-old")
    [leased] = await queue.lease_tasks(pool, w, LINUX, 1, LEASE)
    await complete(pool, leased, w, cache_result=b"ar")
    fresh = await queue.enqueue(pool, task(2), "op-new")
    await pool.execute(
        "UPDATE tasks SET completed_at = now() - interval '8 days' WHERE id = $1", queued.task_id
    )
    assert await queue.purge_finished_tasks(pool, timedelta(days=7)) == 1
    assert await pool.fetchval("SELECT count(*) FROM tasks") == 1
    assert await pool.fetchval("SELECT count(*) FROM operations WHERE name = 'op-old'") == 0
    assert await events(pool, queued.task_id) == ["queued", "leased", "completed"]
    assert await pool.fetchval("SELECT count(*) FROM action_cache") == 1
    assert (await queue.get_task(pool, fresh.task_id)).state == "queued"


async def test_history_past_its_retention_is_purged_oldest_first(pool):
    old = await queue.enqueue(pool, task(1), "op-1")
    recent = await queue.enqueue(pool, task(2), "op-2")
    await pool.execute(
        "UPDATE task_events SET at = now() - interval '91 days' WHERE task_id = $1", old.task_id
    )
    fetch = assets.FetchRecord("", "blob", ["https://example.com/a"], {}, "failed", "tester")
    await assets.record_fetch(pool, fetch)
    await assets.record_fetch(pool, fetch)
    await pool.execute(
        "UPDATE asset_fetches SET fetched_at = now() - interval '91 days' "
        "WHERE id = (SELECT min(id) FROM asset_fetches)"
    )

    assert await queue.purge_task_events(pool, timedelta(days=90)) == 1
    assert await events(pool, old.task_id) == []
    assert await events(pool, recent.task_id) == ["queued"]
    assert await queue.purge_task_events(pool, timedelta(days=90)) == 0
    assert await assets.purge_asset_fetches(pool, timedelta(days=90)) == 1
    assert await pool.fetchval("SELECT count(*) FROM asset_fetches") == 1


async def test_a_history_purge_reads_only_the_oldest_events(pool):
    """Each pass looks at the first `batch_size` events by id, so a table that is all within
    its retention costs one short index walk, and a purge never reaches past an event that
    is still kept."""
    kept = await queue.enqueue(pool, task(1), "op-1")
    later = await queue.enqueue(pool, task(2), "op-2")
    await pool.execute(
        "UPDATE task_events SET at = now() - interval '91 days' WHERE task_id = $1", later.task_id
    )
    assert await queue.purge_task_events(pool, timedelta(days=90), batch_size=1) == 0
    assert await events(pool, later.task_id) == ["queued"]
    # A pass that deletes nothing locks nothing either: no row got a locker's xmax.
    assert await pool.fetchval("SELECT count(*) FROM task_events WHERE xmax <> '0'") == 0
    assert await queue.purge_task_events(pool, timedelta(days=90)) == 1
    assert await events(pool, kept.task_id) == ["queued"]
