"""Round trips of one no-op action, end to end: gRPC calls by method and SQL statements.

For each code tree (`--code DIR`, and `--baseline REV` exported from git, as in
`bench/noop_load.py`): a real server and one worker daemon start as processes against a
fresh database on a PostgreSQL started here with `pg_stat_statements` loaded. The client
(this process) and the worker reach the server through two counting gRPC proxies in this
process, so every call is counted by method and by caller, whatever the code measured.
Then `--actions` unique no-op actions run one at a time, or `--clients` at once
(upload Command and Action, Execute with skip_cache_lookup), and an idle window as long as that run is measured too,
so what is per action (enqueue, lease, complete...) stands apart from what is per second
(heartbeats, polls that time out, the reaper). Printed per tree: calls per action of each
gRPC method and of each SQL statement (by its `-- name:` in expbuild/sql).

    .venv/bin/python bench/round_trips.py --baseline main --code .
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.noop_load import (  # noqa: E402
    Deployment,
    Load,
    planned,
    wait_for_workers,
)
from bench.queue_throughput import fresh_database  # noqa: E402
from expbuild.client.cas import CasClient  # noqa: E402
from expbuild.client.channel import open_channel  # noqa: E402
from expbuild.client.execution import ExecutionClient  # noqa: E402
from expbuild.digest import digest_of  # noqa: E402
from tests.postgres import LocalPostgres, free_port, postgres_bindir  # noqa: E402


class CountingPostgres(LocalPostgres):
    """The tests' throwaway cluster, with pg_stat_statements loaded."""

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
            "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=top"
        )
        self._pg_ctl("-o", options, "-l", str(self.base / "log"), "-w", "start")


# --- a gRPC proxy that counts calls -------------------------------------------------------


class CountingProxy(grpc.GenericRpcHandler):
    """Forwards every call, whatever its method or streaming kind, as raw bytes to
    `upstream`, counting calls by method."""

    def __init__(self, upstream: grpc.aio.Channel):
        self.upstream = upstream
        self.counts: collections.Counter[str] = collections.Counter()

    def service(self, handler_call_details):
        method = handler_call_details.method
        forward = self.upstream.stream_stream(method)

        async def handle(requests, context):
            self.counts[method.rsplit("/", 1)[-1]] += 1
            metadata = tuple(
                (k, v) for k, v in context.invocation_metadata() if not k.startswith(":")
            )
            call = forward(requests, metadata=metadata)
            try:
                async for reply in call:
                    yield reply
            except grpc.aio.AioRpcError as exc:
                context.set_trailing_metadata(exc.trailing_metadata() or ())
                await context.abort(exc.code(), exc.details() or "")

        return grpc.stream_stream_rpc_method_handler(handle)


@dataclass
class Proxy:
    name: str
    upstream_address: str
    address: str = ""
    handler: CountingProxy | None = None
    server: grpc.aio.Server | None = None
    channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.upstream_address)
        self.handler = CountingProxy(self.channel)
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self.handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0.5)
        if self.channel is not None:
            await self.channel.close()


# --- SQL statements by name -----------------------------------------------------------------


def _canonical(text: str) -> str:
    """Without comments, whitespace runs or constants (pg_stat_statements shows constants
    as parameters)."""
    text = re.sub(r"--[^\n]*", "", text)
    text = re.sub(r"'(?:[^']|'')*'|\$\d+|\b\d+\b", "?", text)
    return re.sub(r"\s+", " ", text).strip().rstrip(";").strip()


def statement_names(code: Path) -> dict[str, str]:
    """Canonical text → `-- name:` of every statement in the tree's expbuild/sql."""
    names = {}
    for path in sorted((code / "expbuild" / "sql").glob("*.sql")):
        for block in re.split(r"^-- name: ", path.read_text(), flags=re.M)[1:]:
            name, _, body = block.partition("\n")
            names[_canonical(body)] = name.strip()
    return names


async def statement_counts(db: asyncpg.Connection, names: dict[str, str]) -> collections.Counter:
    rows = await db.fetch(
        """SELECT query, calls FROM pg_stat_statements
           WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"""
    )
    counts: collections.Counter[str] = collections.Counter()
    for row in rows:
        text = _canonical(row["query"])
        if "pg_stat_statements" in text or "pg_stat_database" in text:
            continue  # this script's own
        # pg_stat_statements may number a statement's constants differently: then its start.
        label = (
            names.get(text)
            or next((n for t, n in names.items() if t[:100] == text[:100]), None)
            or text[:60]
        )
        counts[label] += row["calls"]
    return counts


# --- one tree -------------------------------------------------------------------------------


@dataclass
class Counts:
    actions: int = 0
    seconds: float = 0.0
    idle_seconds: float = 0.0
    rpcs: dict[str, collections.Counter] = field(default_factory=dict)  # caller → method → n
    idle_rpcs: dict[str, collections.Counter] = field(default_factory=dict)
    sql: collections.Counter = field(default_factory=collections.Counter)
    idle_sql: collections.Counter = field(default_factory=collections.Counter)


async def _window(db, proxies, names, work) -> tuple[dict, collections.Counter, float]:
    for proxy in proxies:
        assert proxy.handler is not None
        proxy.handler.counts.clear()
    await db.execute("SELECT pg_stat_statements_reset()")
    started = time.perf_counter()
    await work()
    seconds = time.perf_counter() - started
    rpcs = {p.name: collections.Counter(p.handler.counts) for p in proxies if p.handler}
    return rpcs, await statement_counts(db, names), seconds


async def measure(deployment: Deployment, admin_url: str, args) -> Counts:
    name = "expbuild_bench_trips_" + re.sub(r"\W", "_", deployment.label).strip("_")
    url = await fresh_database(admin_url, name)
    db = await asyncpg.connect(url)
    await db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    names = statement_names(deployment.code)
    server_address = f"127.0.0.1:{free_port()}"
    client_proxy, worker_proxy = Proxy("client", server_address), Proxy("worker", server_address)
    await client_proxy.start()
    await worker_proxy.start()
    deployment.worker_count = 1
    deployment.worker_address = worker_proxy.address
    counts = Counts(actions=args.actions)
    proxies = [client_proxy, worker_proxy]
    with tempfile.TemporaryDirectory(prefix="expbuild-bench-") as scratch:
        deployment.start(url, Path(scratch), server_address)
        try:
            try:
                await wait_for_workers(db, 1, deployment)
            except SystemExit:
                print_logs(Path(scratch))  # the scratch directory goes with the exit
                raise
            async with open_channel(client_proxy.address) as channel:
                cas = await CasClient.connect(channel)
                load = Load(cas, ExecutionClient(channel), deployment.label)
                await cas.upload({digest_of(load.root): load.root})
                await load.many(args.warmup, 1)

                async def run() -> None:
                    await load.many(args.actions, args.clients)

                counts.rpcs, counts.sql, counts.seconds = await _window(db, proxies, names, run)

                async def idle() -> None:
                    await asyncio.sleep(counts.seconds)

                counts.idle_rpcs, counts.idle_sql, counts.idle_seconds = await _window(
                    db, proxies, names, idle
                )
        finally:
            deployment.stop()
            await client_proxy.stop()
            await worker_proxy.stop()
            await db.close()
            conn = await asyncpg.connect(admin_url)
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await conn.close()
    return counts


def print_logs(folder: Path) -> None:
    for log in sorted(folder.glob("*.log")):
        print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)


def report(columns: dict[str, Counts]) -> str:
    """Per action: the run's count less the idle window's (same length), and the raw count."""
    labels = list(columns)
    lines: list[tuple[str, list[str]]] = []

    def cell(c: Counts, run: float, idle: float) -> str:
        return f"{(run - idle) / c.actions:.2f} ({run / c.actions:.2f})"

    def section(title: str, get_run, get_idle) -> None:
        keys: set[str] = set()
        for c in columns.values():
            keys |= set(get_run(c)) | set(get_idle(c))
        rows = []
        totals = [0.0 for _ in labels]
        idle_totals = [0.0 for _ in labels]
        for key in sorted(keys):
            cells = []
            for i, label in enumerate(labels):
                c = columns[label]
                run, idle = get_run(c).get(key, 0), get_idle(c).get(key, 0)
                totals[i] += run
                idle_totals[i] += idle
                cells.append(cell(c, run, idle))
            rows.append((f"  {key}", cells))
        lines.append((title, []))
        lines.extend(rows)
        lines.append(
            (
                f"  = all {title.split()[0]}",
                [cell(columns[label], totals[i], idle_totals[i]) for i, label in enumerate(labels)],
            )
        )

    for caller in ("client", "worker"):
        section(
            f"{caller} RPCs",
            lambda c, k=caller: c.rpcs.get(k, {}),
            lambda c, k=caller: c.idle_rpcs.get(k, {}),
        )
    section("SQL statements", lambda c: c.sql, lambda c: c.idle_sql)
    width = max(len(name) for name, _ in lines) + 2
    widths = [
        max(len(label), *(len(v[i]) for _, v in lines if v)) + 2 for i, label in enumerate(labels)
    ]
    out = ["per action: run less idle (raw)".ljust(width)]
    out[0] += "".join(label.rjust(w) for label, w in zip(labels, widths, strict=True))
    for name, values in lines:
        cells = "".join(v.rjust(w) for v, w in zip(values, widths, strict=False))
        out.append(name.ljust(width) + cells)
    return "\n".join(out)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REV", help="git revision measured as 'today'")
    parser.add_argument(
        "--code", action="append", default=[], metavar="DIR", help="a tree to measure"
    )
    parser.add_argument("--actions", type=int, default=50, help="serial actions counted")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--clients", type=int, default=1, help="concurrent clients (1: one action at a time)"
    )
    # noop_load.planned's other options: one server process, workers without limits.
    parser.set_defaults(server_processes=[], limits=False)
    args = parser.parse_args()
    bindir = postgres_bindir()
    if bindir is None:
        raise SystemExit("needs the machine's PostgreSQL binaries (initdb, pg_ctl)")
    cluster = CountingPostgres(bindir)
    cluster.init_and_start()
    try:
        columns = {}
        for deployment in planned(args):
            print(f"counting {deployment.label} from {deployment.code} ...", file=sys.stderr)
            columns[deployment.label] = await measure(deployment, cluster.url, args)
    finally:
        cluster.remove()
    first = next(iter(columns.values()))
    print(
        f"Round trips of one no-op action ({first.actions} actions, {args.clients} client(s), "
        "1 worker; "
        "each cell: calls per action less an idle window of the same length, then raw):"
    )
    print(report(columns))


if __name__ == "__main__":
    asyncio.run(main())
