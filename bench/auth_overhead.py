"""The cost of authentication per RPC: FindMissingBlobs round trips against one server
with [auth] mode = "none" and one with "tokens" (a valid token, served from the
per-replica cache after its first call), in the same run, over loopback gRPC.

Two token modes: `tokens` sends the header as each call's metadata (the server's cost
alone, as Bazel pays it); `tokens+lib` lets expbuild's channel add it (ChannelSecurity,
a grpc.aio client interceptor: what the CLI and workers pay).

    .venv/bin/python bench/auth_overhead.py [--calls 3000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.queue_throughput import fresh_database  # noqa: E402
from expbuild.auth.token_secrets import new_secret, secret_hash  # noqa: E402
from expbuild.client.channel import ChannelSecurity, open_channel  # noqa: E402
from expbuild.config import AuthSettings  # noqa: E402
from expbuild.db import tokens as db_tokens  # noqa: E402
from expbuild.proto import remote_execution_pb2 as re_pb2  # noqa: E402
from expbuild.proto import remote_execution_pb2_grpc as re_grpc  # noqa: E402
from tests.postgres import find_postgres  # noqa: E402
from tests.serving import running_server, server_settings  # noqa: E402


async def round_trips(
    target: str, token: str, via_library: bool, calls: int, concurrency: int
) -> list[float]:
    request = re_pb2.FindMissingBlobsRequest()
    latencies: list[float] = []
    security = ChannelSecurity(token=token if via_library else "")
    metadata = (("authorization", f"Bearer {token}"),) if token and not via_library else None
    async with open_channel(target, security) as channel:
        stub = re_grpc.ContentAddressableStorageStub(channel)
        await stub.FindMissingBlobs(request, metadata=metadata)  # connect, fill the cache

        async def worker(count: int) -> None:
            for _ in range(count):
                started = time.perf_counter()
                await stub.FindMissingBlobs(request, metadata=metadata)
                latencies.append(time.perf_counter() - started)

        share = calls // concurrency
        await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    return latencies


def line(name: str, latencies: list[float], wall: float) -> str:
    ordered = sorted(latencies)
    p99 = ordered[int(len(ordered) * 0.99)]
    return (
        f"{name:<10} p50 {statistics.median(ordered) * 1e6:7.0f} µs   p99 {p99 * 1e6:7.0f} µs   "
        f"{len(ordered) / wall:7.0f} calls/s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternate modes this often")
    args = parser.parse_args()
    with find_postgres() as (_, admin_url), tempfile.TemporaryDirectory() as tmp:
        url = await fresh_database(admin_url, "expbuild_bench_auth")
        base = server_settings(Path(tmp) / "cas")
        secured = replace(base, auth=AuthSettings(mode="tokens", cache_ttl=timedelta(seconds=5)))
        modes = ("none", "tokens", "tokens+lib")
        results: dict[str, tuple[list[float], float]] = {mode: ([], 0.0) for mode in modes}
        async with running_server(base, url) as plain, running_server(secured, url) as guarded:
            secret = new_secret()
            await db_tokens.create_token(
                guarded.pool,
                name="bench",
                secret_sha256=secret_hash(secret),
                scopes=["cas:read"],
                instances=[],
                expires_at=None,
            )
            for _ in range(args.rounds):  # alternate, so load drift hits both alike
                for mode, app, token in (
                    ("none", plain, ""),
                    ("tokens", guarded, secret),
                    ("tokens+lib", guarded, secret),
                ):
                    started = time.perf_counter()
                    found = await round_trips(
                        f"127.0.0.1:{app.port}",
                        token,
                        mode == "tokens+lib",
                        args.calls,
                        args.concurrency,
                    )
                    latencies, wall = results[mode]
                    results[mode] = (latencies + found, wall + time.perf_counter() - started)
        for mode, (latencies, wall) in results.items():
            print(line(mode, latencies, wall))
        none_p50 = statistics.median(results["none"][0])
        for mode in modes[1:]:
            cost = statistics.median(results[mode][0]) - none_p50
            print(f"{mode}: cost per RPC (p50 difference to none): {cost * 1e6:.0f} µs")


if __name__ == "__main__":
    asyncio.run(main())
