"""Chaos with real processes: ten actions that each append their number to a marker file
when they finish, and one fault in the middle. Every fault must lose nothing, run nothing
twice to completion, and recover within the bound of issue #9:

| fault | bound |
|---|---|
| kill -9 a busy worker | its actions start again elsewhere within 10 s |
| kill -9 the replica, start it again 2 s later | no action runs twice |
| restart PostgreSQL (`pg_ctl restart -m fast`) | every Execute succeeds (the client sees at most UNAVAILABLE, which it retries) |
| SIGTERM a busy worker | its actions finish; it exits within its grace (30 s) + 5 s |
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.postgres import free_port
from tests.processes import BIN, Process, server_env, start, wait_for_log, wait_healthy

pytestmark = pytest.mark.e2e

ACTIONS = 10
ACTION_SECONDS = 3


def replica(database_url: str, tmp_path: Path, port: int, name: str = "server", **extra: str):
    env = {**server_env(database_url, tmp_path, port), **extra}
    process = start(name, ["expbuild", "server"], tmp_path, env)
    wait_healthy(env["EXPBUILD_SERVER__ADDRESS"], process)
    return process


def worker(name: str, address: str, tmp_path: Path, slots: int):
    env = {
        "EXPBUILD_WORKER__SERVER_URL": f"http://{address}",
        "EXPBUILD_WORKER__NAME": name,
        "EXPBUILD_WORKER__MAX_CONCURRENT_TASKS": str(slots),
        "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(tmp_path / f"work-{name}"),
        "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",  # pytest's tmp tree is root's alone
    }
    process = start(name, ["expbuild", "worker", "daemon"], tmp_path, env)
    wait_for_log(process, "registered successfully")
    return process


def submit_all(address: str, tmp_path: Path, marker: Path) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [
                str(BIN / "expbuild"),
                "run",
                "--server",
                address,
                "--json",
                "--no-cache",
                "--",
                "sh",
                "-c",
                f"sleep {ACTION_SECONDS}; echo {n} >> {marker}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )
        for n in range(ACTIONS)
    ]


async def wait_running(database_url: str, count: int, timeout: float = 60) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        while await conn.fetchval("SELECT count(*) FROM tasks WHERE state = 'leased'") < count:
            assert time.monotonic() < deadline, f"{count} actions never ran at once"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


def assert_all_once(clients: list[subprocess.Popen], marker: Path) -> None:
    for client in clients:
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err.decode(errors="replace")
        assert json.loads(out)["exit_code"] == 0
    finished = sorted(int(line) for line in marker.read_text().split())
    assert finished == list(range(ACTIONS)), f"lost or run twice: {finished}"


async def events(database_url: str, event: str) -> list:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT task_id, at, detail FROM task_events WHERE event = $1", event
        )
    finally:
        await conn.close()


async def test_kill_9_a_busy_worker(restartable_postgres, tmp_path):
    url, port = restartable_postgres.url, free_port()
    address = f"127.0.0.1:{port}"
    server = replica(url, tmp_path, port)
    doomed = worker("doomed", address, tmp_path, slots=5)
    marker = tmp_path / "marker"
    try:
        clients = submit_all(address, tmp_path, marker)
        await wait_running(url, 5)
        spare = worker("spare", address, tmp_path, slots=5)
        await wait_running(url, ACTIONS)
        killed_at = await _db_now(url)
        doomed.stop(signal.SIGKILL)
        assert_all_once(clients, marker)
        requeued = await events(url, "requeued")
        assert requeued, "the dead worker's actions were never requeued"
        recovery = max((r["at"] - killed_at).total_seconds() for r in requeued)
        print(f"kill -9 a busy worker: its actions requeued {recovery:.1f} s after")
        assert recovery <= 10, f"requeued {recovery:.1f} s after the kill"
        spare.stop()
    finally:
        doomed.stop(signal.SIGKILL)
        server.stop()


@dataclass
class BusyCluster:
    url: str
    port: int
    server: Process  # replaced when a test starts the replica again
    clients: list[subprocess.Popen]
    marker: Path


@contextlib.asynccontextmanager
async def all_actions_running(postgres, tmp_path: Path) -> AsyncIterator[BusyCluster]:
    """A replica and two 5-slot workers, every action running on them at once."""
    url, port = postgres.url, free_port()
    address = f"127.0.0.1:{port}"
    cluster = BusyCluster(url, port, replica(url, tmp_path, port), [], tmp_path / "marker")
    workers = [worker(f"w{n}", address, tmp_path, slots=5) for n in range(2)]
    try:
        cluster.clients = submit_all(address, tmp_path, cluster.marker)
        await wait_running(url, ACTIONS)
        yield cluster
    finally:
        for each in workers:
            each.stop()
        cluster.server.stop()


async def test_kill_9_the_replica_and_start_it_again(restartable_postgres, tmp_path):
    async with all_actions_running(restartable_postgres, tmp_path) as cluster:
        cluster.server.stop(signal.SIGKILL)
        await asyncio.sleep(2)  # the fault itself: the replica is away for two seconds
        # A loaded machine may take the workers more than the default 5 s grace to find
        # the new replica; the promise is no rerun for a restart within 30 s.
        cluster.server = replica(
            cluster.url,
            tmp_path,
            cluster.port,
            name="server-again",
            EXPBUILD_SERVER__WORKER_DISCONNECT_GRACE="30s",
        )
        assert_all_once(cluster.clients, cluster.marker)
        requeued = await events(cluster.url, "requeued")
        assert requeued == [], "an action ran again after the restart"
        assert len(await events(cluster.url, "completed")) == ACTIONS


async def test_restart_postgres(restartable_postgres, tmp_path):
    async with all_actions_running(restartable_postgres, tmp_path) as cluster:
        restartable_postgres.restart()
        assert_all_once(cluster.clients, cluster.marker)
        assert "internal error" not in cluster.server.log()
        assert len(await events(cluster.url, "completed")) == ACTIONS


async def test_sigterm_a_busy_worker(restartable_postgres, tmp_path):
    url, port = restartable_postgres.url, free_port()
    address = f"127.0.0.1:{port}"
    server = replica(url, tmp_path, port)
    leaving = worker("leaving", address, tmp_path, slots=5)
    marker = tmp_path / "marker"
    staying = None
    try:
        clients = submit_all(address, tmp_path, marker)
        await wait_running(url, 5)
        staying = worker("staying", address, tmp_path, slots=5)
        await wait_running(url, ACTIONS)
        asked = time.monotonic()
        leaving.popen.send_signal(signal.SIGTERM)
        assert leaving.popen.wait(timeout=35) == 0, leaving.log()
        assert time.monotonic() - asked <= 30 + 5
        assert_all_once(clients, marker)
        assert await events(url, "requeued") == []
        assert await events(url, "released") == []  # finished within the grace, not handed back
    finally:
        leaving.stop(signal.SIGKILL)
        if staying is not None:
            staying.stop()
        server.stop()


async def _db_now(url: str):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT now()")
    finally:
        await conn.close()
