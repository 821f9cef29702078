"""Queue throughput: enqueue, lease and complete against a real PostgreSQL.

Prints jobs/s for several shapes next to the bare SKIP LOCKED loop measured in the same
run on the same database (a table of ids and states: claim with `FOR UPDATE SKIP
LOCKED`, mark done; no events, no operations, no NOTIFY, no fencing token). Machines are
noisy; compare ratios, not absolute numbers. Each shape also prints the WAL it wrote per
task and how many of its row updates were HOT. Ends with the EXPLAIN ANALYZE of the
lease and complete statements with a full queue.

    .venv/bin/python bench/queue_throughput.py [--tasks 4000] [--consumers 4] [--rounds 3]

Uses EXPBUILD_TEST_DATABASE_URL if set, else starts a throwaway server the way the tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from expbuild.db import queue, workers  # noqa: E402
from expbuild.db.migrate import migrate  # noqa: E402
from expbuild.db.pool import create_pool  # noqa: E402
from expbuild.digest import digest_of  # noqa: E402
from tests.postgres import find_postgres  # noqa: E402

LINUX = {"OSFamily": ["Linux"]}
DARWIN = {"OSFamily": ["Darwin"]}
LEASE = timedelta(minutes=5)


async def fresh_database(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f"DROP DATABASE IF EXISTS {name}")
    await conn.execute(f"CREATE DATABASE {name}")
    await conn.close()
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(url)
    await migrate(conn)
    await conn.close()
    return url


async def enqueue_all(pool, count: int, producers: int, tag: str) -> float:
    started = time.perf_counter()

    async def produce(offset: int) -> None:
        for n in range(offset, count, producers):
            task = queue.NewTask("", digest_of(f"{tag}-{n}".encode()), {"OSFamily": ["Linux"]})
            await queue.enqueue(pool, task, f"{tag}-op-{n}")

    await asyncio.gather(*(produce(i) for i in range(producers)))
    return count / (time.perf_counter() - started)


def done(task: queue.LeasedTask) -> queue.Completion:
    return queue.Completion(task.task_id, task.lease_token, True, b"")


async def drain(pool, consumers: int, batch: int, *, batched: bool = False) -> tuple[int, float]:
    ids = [
        await workers.register_worker(
            pool, worker_id="", name=f"bench-{i}", hostname="", platform=LINUX, max_concurrent=batch
        )
        for i in range(consumers)
    ]
    finished = 0
    started = time.perf_counter()

    async def consume(worker_id: str) -> None:
        nonlocal finished
        while True:
            leased = await queue.lease_tasks(pool, worker_id, LINUX, batch, LEASE)
            if not leased:
                return
            if batched:
                await queue.complete_tasks(pool, worker_id, [done(t) for t in leased])
                finished += len(leased)
                continue
            for t in leased:
                await queue.complete_task(
                    pool,
                    t.task_id,
                    t.lease_token,
                    worker_id,
                    succeeded=True,
                    response=b"",
                    cache_result=None,
                )
            finished += len(leased)

    await asyncio.gather(*(consume(w) for w in ids))
    return finished, finished / (time.perf_counter() - started)


@dataclass(frozen=True)
class Writes:
    """WAL written and row updates (HOT or not) of one table: what a run wrote."""

    wal_bytes: int
    updates: int
    hot_updates: int

    @staticmethod
    async def now(pool, table: str) -> Writes:
        # Backends report their table statistics at most once a second: make each of the
        # pool's connections report now.
        connections = [await pool.acquire() for _ in range(pool.get_max_size())]
        for conn in connections:
            await conn.execute("SELECT pg_stat_force_next_flush()")
            await conn.execute("SELECT 1")
            await pool.release(conn)
        row = await pool.fetchrow(
            """SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint AS wal,
                      coalesce((SELECT n_tup_upd FROM pg_stat_user_tables
                                WHERE relname = $1), 0) AS upd,
                      coalesce((SELECT n_tup_hot_upd FROM pg_stat_user_tables
                                WHERE relname = $1), 0) AS hot""",
            table,
        )
        return Writes(row["wal"], row["upd"], row["hot"])

    def __sub__(self, other: Writes) -> Writes:
        return Writes(
            self.wal_bytes - other.wal_bytes,
            self.updates - other.updates,
            self.hot_updates - other.hot_updates,
        )

    def per_task(self, tasks: int) -> str:
        hot = f"{100 * self.hot_updates / self.updates:.0f}" if self.updates else "-"
        return (
            f"{self.wal_bytes / tasks:6.0f} B of WAL per task; "
            f"{self.updates / tasks:4.1f} row updates per task, {hot} % HOT"
        )


BARE_SCHEMA = """
DROP TABLE IF EXISTS bare_jobs;
CREATE TABLE bare_jobs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                        state text NOT NULL DEFAULT 'queued');
CREATE INDEX bare_jobs_queued ON bare_jobs (id) WHERE state = 'queued';
"""
BARE_CLAIM = """
UPDATE bare_jobs SET state = 'running'
WHERE id IN (SELECT id FROM bare_jobs WHERE state = 'queued' ORDER BY id
             FOR UPDATE SKIP LOCKED LIMIT $1)
RETURNING id
"""
BARE_COMPLETE = "UPDATE bare_jobs SET state = 'done' WHERE id = ANY($1::bigint[])"


async def bare_loop(pool, count: int, consumers: int, batch: int) -> tuple[float, Writes]:
    """The bare claim/complete loop: the same consumers and batch, nothing else."""
    await pool.execute(BARE_SCHEMA)
    await pool.execute(
        "INSERT INTO bare_jobs (state) SELECT 'queued' FROM generate_series(1, $1)", count
    )
    await pool.execute("ANALYZE bare_jobs")
    before = await Writes.now(pool, "bare_jobs")
    started = time.perf_counter()

    async def consume() -> None:
        while True:
            ids = [r["id"] for r in await pool.fetch(BARE_CLAIM, batch)]
            if not ids:
                return
            await pool.execute(BARE_COMPLETE, ids)

    await asyncio.gather(*(consume() for _ in range(consumers)))
    rate = count / (time.perf_counter() - started)
    return rate, await Writes.now(pool, "bare_jobs") - before


async def lease_latency_by_queue_size(pool, largest: int) -> None:
    """p50 of one lease of 8 (then their completion, so the queue keeps its size) with
    1k, 10k, ... `largest` tasks queued: all of the worker's platform, then 90% of one
    it lacks; and the share of heartbeat updates that were HOT."""
    await pool.execute("TRUNCATE tasks, task_events, operations, action_cache CASCADE")
    worker_id = await workers.register_worker(
        pool, worker_id="", name="scale", hostname="", platform=LINUX, max_concurrent=8
    )
    mine = (
        await queue.enqueue(pool, queue.NewTask("", digest_of(b"seed-mine"), LINUX), "s1")
    ).task_id
    theirs = (
        await queue.enqueue(pool, queue.NewTask("", digest_of(b"seed-other"), DARWIN), "s2")
    ).task_id
    ids = {
        name: await pool.fetchval("SELECT platform_id FROM tasks WHERE id = $1", task)
        for name, task in (("mine", mine), ("theirs", theirs))
    }
    print("\nlease latency (p50 of one lease of 8) by queued tasks:")
    print(f"  {'queued':>9}  {'all the worker’s':>17}  {'90% another platform':>21}")
    # The other platform's 90% are queued first: the worst case for one queue walked in
    # (priority, id) order and filtered row by row.
    insert = """INSERT INTO tasks (instance_name, action_digest, platform, platform_id)
                SELECT '', encode(sha256(gen_random_uuid()::text::bytea), 'hex') || '/1',
                       '{}'::jsonb,
                       CASE WHEN n > $1::bigint * 9 / 10 THEN $2::int ELSE $3::int END
                FROM generate_series(1, $1::bigint) n"""

    async def p50_lease_ms() -> float:
        samples = []
        for _ in range(50):
            started = time.perf_counter()
            leased = await queue.lease_tasks(pool, worker_id, LINUX, 8, LEASE)
            samples.append(time.perf_counter() - started)
            await queue.complete_tasks(
                pool,
                worker_id,
                [queue.Completion(t.task_id, t.lease_token, True, b"") for t in leased],
            )
            await pool.execute(insert, len(leased) * 10, ids["mine"], ids["mine"])  # refill
        return statistics.median(samples) * 1000

    size = 1000
    while size <= largest:
        await pool.execute("TRUNCATE tasks, task_events, operations CASCADE")
        await pool.execute(insert, size, ids["mine"], ids["theirs"])
        await pool.execute("VACUUM ANALYZE tasks")
        mixed = await p50_lease_ms()
        await pool.execute("UPDATE tasks SET platform_id = $1 WHERE state = 'queued'", ids["mine"])
        await pool.execute("VACUUM ANALYZE tasks")
        alone = await p50_lease_ms()
        print(f"  {size:>9,}  {alone:>14.2f} ms  {mixed:>18.2f} ms")
        size *= 10

    # Heartbeats of a worker holding 8 leases, with the queue at its largest.
    leased = await queue.lease_tasks(pool, worker_id, LINUX, 8, LEASE)
    running = [(t.task_id, t.lease_token) for t in leased]
    stats = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'tasks'"
    before = await pool.fetchrow(stats)
    while True:  # let every backend report what it did before the heartbeats
        await asyncio.sleep(1.2)
        settled = await pool.fetchrow(stats)
        if settled == before:
            break
        before = settled
    async with pool.acquire() as conn:
        for _ in range(200):
            await workers.heartbeat(conn, worker_id, running, LEASE)
        await conn.execute("SELECT pg_stat_force_next_flush()")
    deadline = time.monotonic() + 10
    while (after := await pool.fetchrow(stats))["n_tup_upd"] < before["n_tup_upd"] + 1600:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    updates = after["n_tup_upd"] - before["n_tup_upd"]
    hot = after["n_tup_hot_upd"] - before["n_tup_hot_upd"]
    extended = 200 * len(running)
    print(
        f"  heartbeats: {extended} lease extensions; HOT task updates meanwhile: {hot} "
        f"({100 * min(hot, extended) / extended:.0f}% of the extensions; "
        f"{updates} task updates in all, other backends' included)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="rounds per shape (medians)")
    parser.add_argument(
        "--scale",
        type=int,
        default=0,
        metavar="N",
        help="also time leases with up to N queued tasks (1k, 10k, ... N), 90%% for a "
        "platform the worker lacks",
    )
    args = parser.parse_args()

    with find_postgres() as (source, admin_url):
        print(f"PostgreSQL from {source}; {args.tasks} tasks, {args.consumers} consumers")
        url = await fresh_database(admin_url, "expbuild_bench")
        pool = await create_pool(url, min_size=args.consumers + 1, max_size=args.consumers + 4)

        rate = await enqueue_all(pool, args.tasks, args.consumers, "enq")
        print(f"enqueue (1 task + operation + event + NOTIFY per transaction): {rate:8.0f} tasks/s")
        await drain(pool, args.consumers, 32)

        print(
            "lease + complete vs the bare SKIP LOCKED loop, by lease batch size "
            "(completions one by one, as CompleteTask sends them, and in one complete_tasks); "
            f"median of {args.rounds} interleaved round(s), and what each task wrote:"
        )
        for batch in (1, 8, 32):
            rates: dict[str, list[float]] = {"single": [], "batched": [], "bare": []}
            ratios: dict[str, list[float]] = {"single": [], "batched": []}
            writes: dict[str, Writes] = {}
            for round_ in range(args.rounds):
                bare, writes["bare"] = await bare_loop(pool, args.tasks, args.consumers, batch)
                rates["bare"].append(bare)
                for shape in ("single", "batched"):
                    await enqueue_all(pool, args.tasks, args.consumers, f"{shape}{batch}-{round_}")
                    before = await Writes.now(pool, "tasks")
                    _, rate = await drain(pool, args.consumers, batch, batched=shape == "batched")
                    writes[shape] = await Writes.now(pool, "tasks") - before
                    rates[shape].append(rate)
                    ratios[shape].append(rate / rates["bare"][-1])
            single, batched, bare = (statistics.median(rates[k]) for k in rates)
            print(
                f"  batch {batch:3d}: bare {bare:7.0f}/s; ours {single:7.0f}/s "
                f"({statistics.median(ratios['single']):4.2f}x), completions batched "
                f"{batched:7.0f}/s ({statistics.median(ratios['batched']):4.2f}x)"
            )
            for shape in ("bare", "single", "batched"):
                print(f"             {shape:>7}: {writes[shape].per_task(args.tasks)}")
        if args.scale:
            await lease_latency_by_queue_size(pool, args.scale)

        await enqueue_all(pool, args.tasks, args.consumers, "explain")
        # As autovacuum would have by now: with fresh statistics the planner walks the
        # partial queue index in order and stops after N rows.
        await pool.execute("ANALYZE tasks")
        worker_id = await workers.register_worker(
            pool, worker_id="", name="explain", hostname="", platform=LINUX, max_concurrent=32
        )
        async with pool.acquire() as conn:
            # Past the first five runs, as the server runs them: from the cached plans.
            for _ in range(6):
                leased = await queue.lease_tasks(conn, worker_id, LINUX, 32, LEASE)
                await queue.complete_tasks(conn, worker_id, [done(t) for t in leased])
            transaction = conn.transaction()
            await transaction.start()
            lease_plan = await conn.fetch(
                "EXPLAIN (ANALYZE, BUFFERS) " + queue.lease_statement(32), worker_id, LINUX, LEASE
            )
            leased = await conn.fetch(
                "SELECT id, lease_token FROM tasks WHERE worker_id = $1 AND state = 'leased'",
                worker_id,
            )
            complete_plan = await conn.fetch(
                "EXPLAIN (ANALYZE, BUFFERS) " + queue.complete_statement(len(leased)),
                [r["id"] for r in leased],
                [r["lease_token"] for r in leased],
                [worker_id] * len(leased),
                ["completed"] * len(leased),
                [b""] * len(leased),
                [None] * len(leased),
                [None] * len(leased),
            )
            await transaction.rollback()  # EXPLAIN ANALYZE really runs them; keep the queue
        for title, plan in (
            ("lease_tasks (32 of a full queue)", lease_plan),
            ("complete_tasks (those 32)", complete_plan),
        ):
            print(f"\nEXPLAIN ANALYZE {title}:")
            for row in plan:
                print("  " + row[0])
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
