"""Two builds through a real server and real workers: a large one queues its actions, then
a small one queues its own behind it; how soon does the small one finish?

Used by tests/test_fair_scheduling.py (which asserts on the lease order) and
bench/fair_scheduling.py (which prints the figures for docs/scheduling.md). Each build sends
Bazel's RequestMetadata header with its own tool_invocation_id on every Execute. The
actions are queued while no worker is online, so both runs start from the same backlog;
the clock starts when the workers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc

from expbuild.db.migrate import migrate
from expbuild.digest import Digest
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.reapi.request_metadata import RequestMetadata
from tests.conftest import with_database
from tests.serving import running_server, running_worker, server_settings
from tests.test_server_execution import put_action

LARGE, SMALL = "build-large", "build-small"


@dataclass(frozen=True)
class BuildFigures:
    fair: bool
    large_actions: int
    small_actions: int
    workers: int
    slots: int
    small_done_s: float  # from the workers' start until the small build's last result
    large_done_s: float
    small_first_lease: int  # 1-based place of the small build's first lease among all leases
    small_last_lease: int
    lease_order: list[str]  # the invocation of each lease, in the order they were leased

    def line(self) -> str:
        return (
            f"fair_scheduling = {str(self.fair).lower():5}: small build ({self.small_actions}) "
            f"done after {self.small_done_s:6.2f} s, leases {self.small_first_lease}-"
            f"{self.small_last_lease} of {len(self.lease_order)}; large build "
            f"({self.large_actions}) done after {self.large_done_s:6.2f} s"
        )


@contextlib.asynccontextmanager
async def fresh_database(
    admin_url: str, template: str | None = None, *, migrations: Path | None = None
) -> AsyncIterator[str]:
    """A new database (a copy of `template`, else migrated here from `migrations`, by
    default the checkout's), dropped afterwards."""
    name = f"expbuild_builds_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(
            f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else "")
        )
    finally:
        await admin.close()
    url = with_database(admin_url, name)
    try:
        if template is None:
            conn = await asyncpg.connect(url)
            try:
                await migrate(conn, migrations)
            finally:
                await conn.close()
        yield url
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


def bazel_metadata(invocation: str, n: int) -> RequestMetadata:
    return RequestMetadata(
        tool_name="bazel",
        tool_version="7.4.1",
        action_id=f"{invocation}-action-{n}",
        tool_invocation_id=invocation,
        correlated_invocations_id=f"ci-{invocation}",
        action_mnemonic="Genrule",
        target_id=f"//{invocation}:step_{n}",
        configuration_id="k8-fastbuild",
    )


async def _queue(stub, digest: Digest, metadata: RequestMetadata):
    """Start an Execute and read up to QUEUED; returns the stream, still open."""
    call = stub.Execute(
        re_pb2.ExecuteRequest(action_digest=digest.to_proto(), skip_cache_lookup=True),
        metadata=(metadata.header(),),
    )
    first = await asyncio.wait_for(call.read(), 60)
    assert first is not grpc.aio.EOF, "Execute ended before QUEUED"
    return call


async def _finished_at(call, started: list[float]) -> float:
    while await call.read() is not grpc.aio.EOF:
        pass
    return time.monotonic() - started[0]


async def run_two_builds(
    database_url: str,
    tmp: Path,
    *,
    fair: bool,
    large: int = 200,
    small: int = 10,
    workers: int = 2,
    slots: int = 4,
) -> BuildFigures:
    """Queue `large` actions of one build, then `small` of another, start the workers and
    time both; the database must be fresh (the lease order is read from all its events)."""
    settings = server_settings(tmp / "cas", fair_scheduling=fair)
    async with running_server(settings, database_url) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = re_grpc.ExecutionStub(channel)
            calls: dict[str, list] = {LARGE: [], SMALL: []}
            for invocation, count in ((LARGE, large), (SMALL, small)):
                digests = [
                    await put_action(app.store, ("true", invocation, str(n))) for n in range(count)
                ]
                # One build's Executes arrive at once, as Bazel's --jobs sends them.
                calls[invocation] = await asyncio.gather(
                    *(
                        _queue(stub, digest, bazel_metadata(invocation, n))
                        for n, digest in enumerate(digests)
                    )
                )
            started = [0.0]
            waits = {
                invocation: [asyncio.create_task(_finished_at(c, started)) for c in these]
                for invocation, these in calls.items()
            }
            async with contextlib.AsyncExitStack() as stack:
                started[0] = time.monotonic()
                for n in range(workers):
                    await stack.enter_async_context(
                        running_worker(app, tmp / f"work-{n}", name=f"fair-{n}", slots=slots)
                    )
                done = {
                    invocation: await asyncio.wait_for(asyncio.gather(*these), 600)
                    for invocation, these in waits.items()
                }
    order = await _lease_order(database_url)
    small_places = [place for place, who in enumerate(order, 1) if who == SMALL]
    return BuildFigures(
        fair=fair,
        large_actions=large,
        small_actions=small,
        workers=workers,
        slots=slots,
        small_done_s=max(done[SMALL]),
        large_done_s=max(done[LARGE]),
        small_first_lease=small_places[0],
        small_last_lease=small_places[-1],
        lease_order=order,
    )


async def _lease_order(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT t.request_metadata->>'tool_invocation_id' AS invocation
               FROM task_events e JOIN tasks t ON t.id = e.task_id
               WHERE e.event = 'leased' ORDER BY e.id"""
        )
    finally:
        await conn.close()
    return [r["invocation"] for r in rows]
