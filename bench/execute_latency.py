"""End-to-end action latency and throughput: client → server → Postgres → worker → back.

Runs N trivial actions (`true`, each distinct so none is a cache hit) through a real
server replica and a real worker in this process, over loopback gRPC, and prints p50/p99
latency and actions/s next to the baseline measured in the same run: the same command
started locally with asyncio.create_subprocess_exec. The ratio is the price of going
remote for a no-op action; real actions are dominated by their own work.

    .venv/bin/python bench/execute_latency.py [--actions 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.queue_throughput import fresh_database  # noqa: E402
from expbuild.client.actions import build_action, build_command  # noqa: E402
from expbuild.client.cas import CasClient  # noqa: E402
from expbuild.client.channel import open_channel  # noqa: E402
from expbuild.client.execution import ExecutionClient  # noqa: E402
from expbuild.config import BackendSettings, WorkerSettings  # noqa: E402
from expbuild.digest import digest_of  # noqa: E402
from expbuild.proto import remote_execution_pb2 as re_pb2  # noqa: E402
from expbuild.reapi.merkle import serialize  # noqa: E402
from expbuild.worker.agent import WorkerAgent  # noqa: E402
from tests.postgres import find_postgres  # noqa: E402
from tests.serving import running_server, server_settings  # noqa: E402


def summary(name: str, latencies: list[float], wall: float) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{name:<22} p50 {statistics.median(ordered) * 1000:7.1f} ms   "
        f"p99 {p99 * 1000:7.1f} ms   {len(ordered) / wall:7.1f} actions/s"
    )


async def timed_all(count: int, concurrency: int, one) -> tuple[list[float], float]:
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def run(n: int) -> None:
        async with gate:
            started = time.perf_counter()
            await one(n)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(run(n) for n in range(count)))
    return latencies, time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    async def local(n: int) -> None:
        process = await asyncio.create_subprocess_exec("sh", "-c", f"true {n}")
        await process.wait()

    base, base_wall = await timed_all(args.actions, args.concurrency, local)

    with find_postgres() as (source, admin_url), tempfile.TemporaryDirectory() as tmp:
        url = await fresh_database(admin_url, "expbuild_bench_execute")
        settings = server_settings(Path(tmp) / "cas")
        async with running_server(settings, url) as app:
            target = f"127.0.0.1:{app.port}"
            worker = WorkerAgent(
                WorkerSettings(
                    server_url=f"http://{target}",
                    name="bench",
                    max_concurrent_tasks=args.concurrency,
                    heartbeat_interval=timedelta(seconds=5),
                    backend=BackendSettings(type="host", work_dir=str(Path(tmp) / "work")),
                )
            )
            job = asyncio.create_task(worker.run())
            async with open_channel(target) as channel:
                cas = await CasClient.connect(channel)
                execution = ExecutionClient(channel)
                root = re_pb2.Directory()
                digests = []
                blobs = {digest_of(serialize(root)): serialize(root)}
                for n in range(args.actions):
                    command = build_command(["sh", "-c", f"true {n}"])
                    action = build_action(digest_of(serialize(command)), digest_of(serialize(root)))
                    blobs[digest_of(serialize(command))] = serialize(command)
                    blobs[digest_of(serialize(action))] = serialize(action)
                    digests.append(digest_of(serialize(action)))
                await cas.upload(blobs)

                async def remote(n: int) -> None:
                    response = await execution.execute(digests[n])
                    assert response.result.exit_code == 0, response

                remote_latencies, remote_wall = await timed_all(
                    args.actions, args.concurrency, remote
                )
                hits, hits_wall = await timed_all(args.actions, args.concurrency, remote)
            worker.request_stop()
            await job
        conn = await asyncpg.connect(admin_url)
        await conn.execute("DROP DATABASE IF EXISTS expbuild_bench_execute WITH (FORCE)")
        await conn.close()

    print(
        f"PostgreSQL from {source}; {args.actions} actions, {args.concurrency} at a time, "
        "one worker in-process"
    )
    print(summary("local subprocess", base, base_wall))
    print(
        summary("remote execution", remote_latencies, remote_wall)
        + f"   ({statistics.median(remote_latencies) / statistics.median(base):.1f}x local p50)"
    )
    print(
        summary("remote cache hit", hits, hits_wall)
        + f"   ({statistics.median(hits) / statistics.median(base):.1f}x local p50)"
    )


if __name__ == "__main__":
    asyncio.run(main())
