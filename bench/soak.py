"""Soak: ten minutes of mixed load on two replicas and three workers, with a fault every
30 seconds, then what it cost. Not part of the test run.

Load: clients run distinct actions (each appends its number to a marker file when it
starts and when it finishes), re-run earlier ones (cache hits), and upload blobs. Faults, in
turn: kill -9 a busy worker (started again), kill -9 a replica (back 2 s later), restart
PostgreSQL (`pg_ctl restart -m fast`), SIGTERM a worker (started again).

Printed at the end: actions submitted, lost (never answered with exit 0), run twice to
completion, started twice (a rerun after a fault); per fault, how long until the service
completed a fresh action again; RSS of every process and the size of each table, at the
start and at the end.

    .venv/bin/python bench/soak.py [--duration 600] [--fault-every 30] [--clients 6]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from expbuild.client.actions import build_action, build_command  # noqa: E402
from expbuild.client.cas import CasClient  # noqa: E402
from expbuild.client.channel import open_channel  # noqa: E402
from expbuild.client.execution import ExecutionClient  # noqa: E402
from expbuild.client.tree import serialize  # noqa: E402
from expbuild.db.migrate import migrate  # noqa: E402
from expbuild.digest import digest_of  # noqa: E402
from expbuild.proto import remote_execution_pb2 as re_pb2  # noqa: E402
from tests.postgres import LocalPostgres, free_port, postgres_bindir  # noqa: E402
from tests.processes import Process, server_env, start, wait_for_log, wait_healthy  # noqa: E402

TABLES = ("tasks", "task_events", "operations", "action_cache", "workers")


class Cluster:
    def __init__(self, postgres: LocalPostgres, folder: Path):
        self.postgres = postgres
        self.folder = folder
        self.ports = [free_port(), free_port()]
        self.replicas: list[Process | None] = [None, None]
        self.workers: list[Process | None] = [None, None, None]
        self.generation = itertools.count()

    def start_replica(self, n: int) -> None:
        env = server_env(self.postgres.url, self.folder, self.ports[n])
        process = start(
            f"replica-{n}-{next(self.generation)}", ["expbuild", "server"], self.folder, env
        )
        wait_healthy(env["EXPBUILD_SERVER__ADDRESS"], process)
        self.replicas[n] = process

    def start_worker(self, n: int) -> None:
        env = {
            "EXPBUILD_WORKER__SERVER_URL": ",".join(f"127.0.0.1:{p}" for p in self.ports),
            "EXPBUILD_WORKER__NAME": f"soak-{n}",
            "EXPBUILD_WORKER__MAX_CONCURRENT_TASKS": "4",
            "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(self.folder / f"work-{n}"),
            "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",
        }
        process = start(
            f"worker-{n}-{next(self.generation)}",
            ["expbuild", "worker", "daemon"],
            self.folder,
            env,
        )
        wait_for_log(process, "registered successfully")
        self.workers[n] = process

    def processes(self) -> list[Process]:
        return [p for p in (*self.replicas, *self.workers) if p is not None]

    def stop(self) -> None:
        for process in self.processes():
            process.stop()


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def table_sizes(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {t: await conn.fetchval("SELECT pg_total_relation_size($1)", t) for t in TABLES}
    finally:
        await conn.close()


def snapshot(cluster: Cluster, sizes: dict[str, int]) -> str:
    rss = ", ".join(
        f"{p.name.rsplit('-', 1)[0]} {rss_mib(p.popen.pid):.0f}" for p in cluster.processes()
    )
    tables = ", ".join(f"{t} {s / 1024:.0f}" for t, s in sizes.items())
    return f"RSS MiB: {rss}\n    tables KiB: {tables}"


class Load:
    def __init__(self, cluster: Cluster, marker: Path):
        self.cluster = cluster
        self.marker = marker
        self.ids = itertools.count()
        self.done: list[int] = []
        self.lost: list[int] = []
        self.completions: list[float] = []  # when each fresh action finished (monotonic)
        self.submitted_at: dict[int, float] = {}
        self.digests: dict[int, re_pb2.Digest] = {}
        self.hits = 0

    async def prepare(self, cas: CasClient, n: int) -> re_pb2.Digest:
        root = re_pb2.Directory()
        command = build_command(
            [
                "sh",
                "-c",
                f"echo start {n} >> {self.marker}; sleep 0.5; echo end {n} >> {self.marker}",
            ]
        )
        action = build_action(digest_of(serialize(command)), digest_of(serialize(root)))
        blobs = {digest_of(serialize(m)): serialize(m) for m in (root, command, action)}
        await cas.upload(blobs)
        return digest_of(serialize(action))

    async def client(self, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            port = random.choice(self.cluster.ports)
            try:
                async with open_channel(f"127.0.0.1:{port}") as channel:
                    cas = CasClient(channel)
                    execution = ExecutionClient(channel)
                    while time.monotonic() < stop_at:
                        await self.one(cas, execution)
            except Exception:  # noqa: BLE001 - this replica is away: the next loop picks again
                await asyncio.sleep(0.5)

    async def one(self, cas: CasClient, execution: ExecutionClient) -> None:
        if self.done and random.random() < 0.2:
            await execution.execute(self.digests[random.choice(self.done)])  # a cache hit
            self.hits += 1
            return
        if random.random() < 0.1:
            await cas.upload({digest_of(os.urandom(64)): os.urandom(64)})
        n = next(self.ids)
        self.submitted_at[n] = time.monotonic()
        digest = await self.prepare(cas, n)
        self.digests[n] = digest
        deadline = time.monotonic() + 180
        while True:
            try:
                response = await execution.execute(digest)
                if response.status.code == 0 and response.result.exit_code == 0:
                    self.done.append(n)
                    self.completions.append(time.monotonic())
                    return
            except Exception:  # noqa: BLE001 - retried below, as a build tool would
                pass
            if time.monotonic() > deadline:
                self.lost.append(n)
                return
            await asyncio.sleep(1)


async def fault_loop(cluster: Cluster, load: Load, stop_at: float, every: float) -> list:
    faults = itertools.cycle(
        ("kill -9 worker", "kill -9 replica", "restart postgres", "SIGTERM worker")
    )
    happened = []
    while time.monotonic() + every < stop_at:
        await asyncio.sleep(every)
        kind = next(faults)
        at = time.monotonic()
        if kind == "kill -9 worker":
            n = random.randrange(len(cluster.workers))
            cluster.workers[n].stop(signal.SIGKILL)
            await asyncio.to_thread(cluster.start_worker, n)
        elif kind == "kill -9 replica":
            n = random.randrange(len(cluster.replicas))
            cluster.replicas[n].stop(signal.SIGKILL)
            await asyncio.sleep(2)
            await asyncio.to_thread(cluster.start_replica, n)
        elif kind == "restart postgres":
            await asyncio.to_thread(cluster.postgres.restart)
        else:
            n = random.randrange(len(cluster.workers))
            await asyncio.to_thread(cluster.workers[n].stop, signal.SIGTERM, 60)
            await asyncio.to_thread(cluster.start_worker, n)
        happened.append((kind, at))
    return happened


def recovery(load: Load, faults: list) -> dict[str, list[float]]:
    """Per fault: seconds until an action submitted after it completed."""
    times = collections.defaultdict(list)
    for kind, at in faults:
        after = [
            done_at
            for n, done_at in zip(load.done, load.completions, strict=False)
            if load.submitted_at.get(n, 0) >= at
        ]
        times[kind].append(min(after) - at if after else float("inf"))
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--fault-every", type=float, default=30)
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()
    bindir = postgres_bindir()
    if bindir is None:
        sys.exit("needs PostgreSQL's binaries (postgresql-15)")
    folder = Path(tempfile.mkdtemp(prefix="expbuild-soak-"))
    postgres = LocalPostgres(bindir)
    postgres.init_and_start()
    conn = await asyncpg.connect(postgres.url)
    await migrate(conn)
    await conn.close()
    cluster = Cluster(postgres, folder)
    try:
        for n in range(2):
            cluster.start_replica(n)
        for n in range(3):
            cluster.start_worker(n)
        marker = folder / "marker"
        marker.touch()
        load = Load(cluster, marker)
        at_start = snapshot(cluster, await table_sizes(postgres.url))
        stop_at = time.monotonic() + args.duration
        faults, *_ = await asyncio.gather(
            fault_loop(cluster, load, stop_at, args.fault_every),
            *(load.client(stop_at) for _ in range(args.clients)),
        )
        at_end = snapshot(cluster, await table_sizes(postgres.url))
    finally:
        cluster.stop()
        postgres.remove()
    lines = marker.read_text().split("\n")
    ends = collections.Counter(line for line in lines if line.startswith("end "))
    starts = collections.Counter(line for line in lines if line.startswith("start "))
    print(f"{args.duration:g} s, {args.clients} clients, a fault every {args.fault_every:g} s")
    print(
        f"  actions: {len(load.done)} done, {load.hits} cache hits, {len(load.lost)} lost, "
        f"{sum(1 for c in ends.values() if c > 1)} run twice to completion, "
        f"{sum(1 for c in starts.values() if c > 1)} started again after a fault"
    )
    for kind, seconds in sorted(recovery(load, faults).items()):
        finite = [s for s in seconds if s != float("inf")]
        shown = (
            f"median {statistics.median(finite):.1f} s, max {max(finite):.1f} s"
            if finite
            else "never"
        )
        print(f"  recovery after {kind} (x{len(seconds)}): {shown}")
    print(f"  at start: {at_start}")
    print(f"  at end:   {at_end}")


if __name__ == "__main__":
    asyncio.run(main())
