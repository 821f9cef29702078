"""`expbuild tasks list` and `expbuild tasks show`, run as the real CLI against a real
server after real work, and checked against SQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from expbuild.proto import worker_pb2, worker_pb2_grpc
from tests.processes import BIN
from tests.serving import running_server, running_worker, server_settings
from tests.test_metrics import start_execute
from tests.test_server_execution import put_action
from tests.waiting import wait_until


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "expbuild"), "tasks", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
async def worked(database_url, pool, tmp_path):
    """A server where two tasks completed on a real worker and a third was leased by a
    worker that vanished, so its lease expired and it waits in the queue again."""
    settings = server_settings(
        tmp_path / "cas",
        lease_duration=timedelta(seconds=2),
        heartbeat_interval=timedelta(milliseconds=300),
    )
    async with running_server(settings, database_url) as app:
        async with running_worker(app, tmp_path / "work", name="builder-1"):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                for word in ("one", "two"):
                    reader, _ = await start_execute(
                        channel, await put_action(app.store, ("echo", word))
                    )
                    await asyncio.wait_for(reader, 60)
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                request = worker_pb2.RegisterWorkerRequest(name="flaky", max_concurrent_tasks=1)
                request.platform.properties.add(name="OSFamily", value="Windows")
                flaky = (await stub.RegisterWorker(request)).worker_id
                parked = await put_action(
                    app.store, ("cmd", "/c", "ver"), platform=[("OSFamily", "Windows")]
                )
                reader, operation = await start_execute(channel, parked)
                leased = await stub.PollTasks(worker_pb2.PollTasksRequest(worker_id=flaky))
                task_id = int(leased.tasks[0].task_id.removeprefix("task-"))

                async def requeued():
                    return await pool.fetchval(
                        "SELECT state = 'queued' FROM tasks WHERE id = $1", task_id
                    )

                await wait_until(requeued, what="the lease to expire")
                yield f"127.0.0.1:{app.port}", task_id, operation, flaky
                reader.cancel()


async def test_tasks_list_matches_sql(worked, pool):
    address, parked, _operation, _flaky = worked
    listed = await asyncio.to_thread(cli, "list", "--server", address, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    sql = await pool.fetch("SELECT id, state, attempts, worker_id FROM tasks ORDER BY id DESC")
    assert [r["task_id"] for r in rows] == [f"task-{t['id']}" for t in sql]
    assert [(r["state"], r["attempts"], r["worker_id"]) for r in rows] == [
        (t["state"], t["attempts"], t["worker_id"]) for t in sql
    ]

    async def listing(*args: str) -> list[str]:
        done = await asyncio.to_thread(cli, "list", "--server", address, "--json", *args)
        assert done.returncode == 0, done.stderr
        return [r["task_id"] for r in json.loads(done.stdout)]

    assert await listing("--state", "queued") == [f"task-{parked}"]
    assert await listing("--platform", "OSFamily=Windows") == [f"task-{parked}"]
    assert len(await listing("--state", "completed")) == 2
    assert len(await listing("--since", "1h")) == 3
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert await listing("--since", future) == []

    table = await asyncio.to_thread(cli, "list", "--server", address)
    assert table.returncode == 0 and f"task-{parked}" in table.stdout
    assert "queued" in table.stdout and "completed" in table.stdout

    bad = await asyncio.to_thread(cli, "list", "--server", address, "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr


async def test_tasks_show_gives_the_whole_history(worked, pool):
    address, parked, operation, flaky = worked
    sql = [
        (r["event"], r["worker_id"], r["attempt"])
        for r in await pool.fetch(
            "SELECT event, worker_id, attempt FROM task_events WHERE task_id = $1 ORDER BY id",
            parked,
        )
    ]
    for handle in (f"task-{parked}", str(parked), operation):
        shown = await asyncio.to_thread(cli, "show", handle, "--server", address, "--json")
        assert shown.returncode == 0, shown.stderr
        history = json.loads(shown.stdout)
        assert history["task_id"] == f"task-{parked}"
        assert history["operations"] == [operation]
        assert history["task"]["state"] == "queued"
        assert [(e["event"], e["worker_id"], e["attempt"]) for e in history["events"]] == sql
    events = [e["event"] for e in history["events"]]
    assert events == ["queued", "leased", "lease-expired", "requeued"]
    assert history["events"][1]["worker_name"] == "flaky"
    assert history["events"][3]["detail"] == {"reason": "lease-expired"}

    text = await asyncio.to_thread(cli, "show", f"task-{parked}", "--server", address)
    assert text.returncode == 0
    assert f"{flaky} (flaky" in text.stdout and "reason=lease-expired" in text.stdout

    missing = await asyncio.to_thread(cli, "show", "task-999999", "--server", address)
    assert missing.returncode == 1
    assert "no task task-999999" in missing.stderr and "Traceback" not in missing.stderr
    unknown = await asyncio.to_thread(cli, "show", "no-such-operation", "--server", address)
    assert unknown.returncode == 1 and "no-such-operation" in unknown.stderr
