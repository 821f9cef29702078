"""Fair scheduling between builds (issue #12.1): the figures of docs/scheduling.md.

1. Two builds through a real server and real workers (tests/two_builds.py): a large one
   queues its actions, then a small one; the small build's completion time and its place
   in the lease order, with `[server] fair_scheduling` on and off, in interleaved rounds.
2. Enqueue rate, 4 producers: all tasks of one invocation (they serialise on its rank
   row) against four invocations; with --durable also on a PostgreSQL with fsync and
   synchronous_commit on, where each commit waits for its WAL flush while holding the row.
3. With --queued N (100,000 by default) tasks queued — 50 invocations, 90 % of them on a
   platform the worker lacks — the p50 of one lease of 8 and EXPLAIN ANALYZE of the lease
   and the enqueue statements.

    .venv/bin/python bench/fair_scheduling.py [--rounds 3] [--large 200] [--small 10]

Uses EXPBUILD_TEST_DATABASE_URL if set, else starts a throwaway server the way the tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from expbuild.db import queue, workers  # noqa: E402
from expbuild.db.pool import create_pool  # noqa: E402
from expbuild.db.queries import sql  # noqa: E402
from expbuild.digest import digest_of  # noqa: E402
from tests.postgres import LocalPostgres, find_postgres, postgres_bindir  # noqa: E402
from tests.two_builds import fresh_database, run_two_builds  # noqa: E402

LINUX = {"OSFamily": ["linux"]}
DARWIN = {"OSFamily": ["macos"]}
LEASE = timedelta(minutes=5)


async def two_builds(admin_url: str, rounds: int, large: int, small: int) -> None:
    print(f"\n{large} actions of one build queued, then {small} of another; 2 workers x 4 slots:")
    results: dict[bool, list] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="expbuild-fair-") as tmp:
        for n in range(rounds):
            for fair in (True, False):
                async with fresh_database(admin_url) as url:
                    figures = await run_two_builds(
                        url, Path(tmp) / f"{n}-{fair}", fair=fair, large=large, small=small
                    )
                results[fair].append(figures)
                print("  " + figures.line())
    print("  medians:")
    for fair, runs in results.items():
        small_done = statistics.median(f.small_done_s for f in runs)
        large_done = statistics.median(f.large_done_s for f in runs)
        last = statistics.median(f.small_last_lease for f in runs)
        print(
            f"    fair_scheduling = {str(fair).lower():5}: small build done after "
            f"{small_done:.2f} s (its last lease #{last:.0f}), large build after {large_done:.2f} s"
        )


async def enqueue_rate(pool, producers: int, per_producer: int, *, invocations: int) -> float:
    run = uuid.uuid4().hex[:8]
    started = time.perf_counter()

    async def produce(p: int) -> None:
        for n in range(per_producer):
            new = queue.NewTask(
                "",
                digest_of(f"rate-{run}-{p}-{n}".encode()),
                LINUX,
                invocation_key=f"inv-{p % invocations}",
            )
            await queue.enqueue(pool, new, f"rate-{run}-{p}-{n}")

    await asyncio.gather(*(produce(p) for p in range(producers)))
    return producers * per_producer / (time.perf_counter() - started)


class DurablePostgres(LocalPostgres):
    """The tests' throwaway cluster, but with the defaults' durability (fsync, synchronous
    commits)."""

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1"
        self._pg_ctl("-o", options, "-l", str(self.base / "log"), "-w", "start")


async def enqueue_rates(admin_url: str, label: str) -> None:
    async with fresh_database(admin_url) as url:
        pool = await create_pool(url, min_size=5, max_size=8)
        try:
            print(f"\nenqueue, {label}, 4 producers x 500 (task + operation + event + NOTIFY):")
            await enqueue_rate(pool, 4, 50, invocations=4)  # warm up
            for invocations in (1, 4, 1, 4):
                rate = await enqueue_rate(pool, 4, 500, invocations=invocations)
                print(f"  {invocations} invocation(s): {rate:6.0f} tasks/s")
        finally:
            await pool.close()


async def crowded_queue(pool, queued: int) -> None:
    """`queued` tasks of 50 invocations, 90 % on a platform the worker lacks, each
    invocation's ranks as enqueue would give them."""
    await pool.execute("TRUNCATE tasks, task_events, operations, invocation_ranks CASCADE")
    worker_id = await workers.register_worker(
        pool, worker_id="", name="explain", hostname="", platform=LINUX, max_concurrent=8
    )
    platform_ids = {}
    for name, platform in (("mine", LINUX), ("theirs", DARWIN)):
        new = queue.NewTask("", digest_of(f"seed-{name}".encode()), platform, invocation_key="x")
        task_id = (await queue.enqueue(pool, new, f"seed-{name}")).task_id
        platform_ids[name] = await pool.fetchval(
            "SELECT platform_id FROM tasks WHERE id = $1", task_id
        )
    await pool.execute(
        """INSERT INTO tasks (instance_name, action_digest, platform, platform_id,
                              invocation_key, fair_rank)
           SELECT '', encode(sha256(n::text::bytea), 'hex') || '/1', '{}'::jsonb,
                  CASE WHEN n % 10 = 0 THEN $2::int ELSE $3::int END,
                  'inv-' || (n % 50), n / 50
           FROM generate_series(1, $1::bigint) n""",
        queued,
        platform_ids["mine"],
        platform_ids["theirs"],
    )
    await pool.execute(
        """INSERT INTO invocation_ranks (platform_id, priority, invocation_key, last_rank)
           SELECT platform_id, priority, invocation_key, max(fair_rank) FROM tasks
           WHERE state = 'queued' GROUP BY 1, 2, 3
           ON CONFLICT (platform_id, priority, invocation_key)
               DO UPDATE SET last_rank = excluded.last_rank"""
    )
    await pool.execute("VACUUM ANALYZE tasks")
    await pool.execute("VACUUM ANALYZE invocation_ranks")

    samples = []
    for n in range(50):
        started = time.perf_counter()
        leased = await queue.lease_tasks(pool, worker_id, LINUX, 8, LEASE)
        samples.append(time.perf_counter() - started)
        await queue.complete_tasks(
            pool, worker_id, [queue.Completion(t.task_id, t.lease_token, True, b"") for t in leased]
        )
        for k in range(len(leased)):  # refill, so the queue keeps its size
            new = queue.NewTask(
                "", digest_of(f"refill-{n}-{k}".encode()), LINUX, invocation_key=f"inv-{k}"
            )
            await queue.enqueue(pool, new, f"refill-{n}-{k}")
    print(
        f"\n{queued:,} queued (50 invocations, 90 % another platform): p50 of one lease of 8 "
        f"{statistics.median(samples) * 1000:.2f} ms"
    )

    async with pool.acquire() as conn:
        for title, statement, args in (
            ("lease_tasks (8)", queue.lease_statement(8), (worker_id, LINUX, LEASE)),
            (
                "enqueue_task (invocation inv-7)",
                sql("enqueue_task"),
                (
                    "",
                    str(digest_of(b"explained")),
                    LINUX,
                    0,
                    False,
                    None,
                    3,
                    "explained-op",
                    "",
                    "inv-7",
                    {"tool_name": "bazel", "tool_invocation_id": "inv-7"},
                ),
            ),
        ):
            transaction = conn.transaction()
            await transaction.start()
            plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + statement, *args)
            await transaction.rollback()  # EXPLAIN ANALYZE really runs it; keep the queue
            print(f"\nEXPLAIN ANALYZE {title}:")
            for row in plan:
                print("  " + row[0])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", type=int, default=200)
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--skip-builds", action="store_true", help="only parts 2 and 3")
    parser.add_argument("--durable", action="store_true", help="part 2 on a durable cluster too")
    args = parser.parse_args()

    with find_postgres() as (source, admin_url):
        print(f"PostgreSQL from {source}")
        if not args.skip_builds:
            await two_builds(admin_url, args.rounds, args.large, args.small)
        await enqueue_rates(admin_url, source)
        bindir = postgres_bindir()
        if args.durable and bindir is not None:
            durable = DurablePostgres(bindir)
            try:
                durable.init_and_start()
                await enqueue_rates(durable.url, "durable (fsync, synchronous_commit on)")
            finally:
                durable.remove()
        async with fresh_database(admin_url) as url:
            pool = await create_pool(url, min_size=5, max_size=8)
            try:
                await crowded_queue(pool, args.queued)
            finally:
                await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
