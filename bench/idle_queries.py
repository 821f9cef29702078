"""Idle cost of waiting: database commits per second with many idle long polls and many
Execute streams waiting for queued actions, with the LISTEN connection up (waits sleep
until a notification) and down (waits poll every `notify_fallback_interval`, which is
what every wait did before issue #9.5).

Counts come from `pg_stat_database.xact_commit` of the bench database over a window;
PostgreSQL flushes those statistics lazily, so a longer window is more exact.

    .venv/bin/python bench/idle_queries.py [--pollers 100] [--streams 500] [--window 30]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.queue_throughput import fresh_database  # noqa: E402
from expbuild.config import settings_from_mapping  # noqa: E402
from expbuild.digest import digest_of  # noqa: E402
from expbuild.proto import remote_execution_pb2 as re_pb2  # noqa: E402
from expbuild.proto import remote_execution_pb2_grpc as re_grpc  # noqa: E402
from expbuild.proto import worker_pb2, worker_pb2_grpc  # noqa: E402
from expbuild.server.app import ServerApp  # noqa: E402
from tests.postgres import find_postgres  # noqa: E402


async def put_action(store, n: int) -> re_pb2.Digest:
    command = re_pb2.Command(arguments=["echo", str(n)])
    root = re_pb2.Directory()
    for message in (command, root):
        data = message.SerializeToString()
        await store.put(digest_of(data), data)
    action = re_pb2.Action(
        command_digest=digest_of(command.SerializeToString()).to_proto(),
        input_root_digest=digest_of(root.SerializeToString()).to_proto(),
    )
    data = action.SerializeToString()
    await store.put(digest_of(data), data)
    return digest_of(data).to_proto()


async def poll_forever(stub, worker_id: str) -> None:
    while True:
        await stub.PollTasks(worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=1))


async def commits(url: str, database: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", database
        )
    finally:
        await conn.close()


async def measure(app: ServerApp, url: str, database: str, window: float) -> float:
    # Let every waiter settle, and PostgreSQL flush the statistics of the set-up (a backend
    # may hold them up to 10 s).
    await asyncio.sleep(12)
    before = await commits(url, database)
    await asyncio.sleep(window)
    after = await commits(url, database)
    return (after - before) / window


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pollers", type=int, default=100)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args()
    with find_postgres() as (source, admin_url), tempfile.TemporaryDirectory() as tmp:
        database = "expbuild_bench_idle"
        url = await fresh_database(admin_url, database)
        settings = settings_from_mapping({"cas": {"root": f"{tmp}/cas"}}, source="bench")
        server = replace(
            settings.server,
            address="127.0.0.1:0",
            metrics_address="",
            reject_unmatched_platforms=False,  # the actions wait for a platform nobody has
            reap_interval=timedelta(seconds=5),
        )
        app = ServerApp(replace(settings, server=server), url)
        await app.start()
        calls = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                # Streams first: each queued action NOTIFYs, and a wake that no poller
                # can use goes round all of them once, which is not what idle costs.
                execution = re_grpc.ExecutionStub(channel)
                for n in range(args.streams):
                    digest = await put_action(app.store, n)
                    stream = execution.Execute(re_pb2.ExecuteRequest(action_digest=digest))
                    await stream.read()
                    calls.append(stream)
                workers = worker_pb2_grpc.WorkerServiceStub(channel)
                for n in range(args.pollers):
                    request = worker_pb2.RegisterWorkerRequest(name=f"idle-{n}")
                    request.platform.properties.add(name="OSFamily", value="Plan9")
                    worker_id = (await workers.RegisterWorker(request)).worker_id
                    calls.append(asyncio.ensure_future(poll_forever(workers, worker_id)))
                listening = await measure(app, url, database, args.window)
                await app.notifications.stop()  # as if the listener were down: waits poll
                polling = await measure(app, url, database, args.window)
                print(
                    f"PostgreSQL from {source}; {args.pollers} idle long polls, "
                    f"{args.streams} waiting Execute streams, {args.window:g} s windows"
                )
                print(f"  LISTEN connected (waits sleep):        {listening:7.1f} commits/s")
                print(
                    f"  LISTEN down (waits poll every {server.notify_fallback_interval.total_seconds():g} s): "
                    f"{polling:7.1f} commits/s"
                )
                for call in calls:
                    call.cancel()
        finally:
            await app.stop(grace=0.5)


if __name__ == "__main__":
    asyncio.run(main())
