"""Metrics that answer questions, checked against what Postgres and the CAS say.

Real work goes through real gRPC (a test-driven Worker API client, so every lease,
completion and expiry is chosen by the test), then `/metrics` is scraped over HTTP and
each number is compared with a SQL count. Counters and histograms live in the process-wide
registry, so the test compares the change between two scrapes.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from datetime import timedelta

import grpc
import pytest
from google.rpc import code_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families

from expbuild.db import queue
from expbuild.digest import Digest, digest_of
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.proto import worker_pb2, worker_pb2_grpc
from expbuild.server.app import ServerApp
from tests import processes
from tests.postgres import free_port
from tests.serving import running_server, server_settings
from tests.test_server_execution import put_action
from tests.waiting import wait_until

Samples = dict[tuple[str, frozenset], float]
# Actions below ask for `Linux`; the server queues them in the lexicon's spelling.
LINUX = "OSFamily=linux"


def scrape(port: int) -> Samples:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


async def start_execute(channel, digest: Digest) -> tuple[asyncio.Task, str]:
    """Execute and read up to QUEUED (or the cached answer); returns the stream's reader."""
    stream = re_grpc.ExecutionStub(channel).Execute(
        re_pb2.ExecuteRequest(action_digest=digest.to_proto())
    )
    first = await asyncio.wait_for(stream.read(), 60)

    async def rest():
        while await stream.read() is not grpc.aio.EOF:
            pass

    return asyncio.create_task(rest()), first.name


def blob_files(root) -> tuple[int, int]:
    count = size = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            count += 1
            size += os.path.getsize(os.path.join(folder, name))
    return count, size


@pytest.fixture
async def server(database_url, tmp_path):
    settings = server_settings(
        tmp_path / "cas", metrics_address="127.0.0.1:0", lease_duration=timedelta(seconds=1)
    )
    # The CAS is measured every second here (30 s by default).
    app = ServerApp(settings, database_url, cas_usage_interval=1.0)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)


async def test_metrics_match_sql_after_real_work(server, pool):
    port = server.metrics_port
    before = await asyncio.to_thread(scrape, port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        request = worker_pb2.RegisterWorkerRequest(name="w1", max_concurrent_tasks=3)
        request.platform.properties.add(name="OSFamily", value="Linux")
        worker_id = (await stub.RegisterWorker(request)).worker_id
        digests = [
            await put_action(server.store, ("echo", word), platform=[("OSFamily", "Linux")])
            for word in ("a", "b", "c")
        ]
        streams = [await start_execute(channel, d) for d in digests]
        # The same action again while it is in flight: merged into its task.
        streams.append(await start_execute(channel, digests[0]))

        leased = (
            await stub.PollTasks(worker_pb2.PollTasksRequest(worker_id=worker_id, max_tasks=3))
        ).tasks
        assert len(leased) == 3
        by_digest = {Digest.from_proto(t.action_digest): t for t in leased}
        for digest in digests[:2]:  # a and b finish; c's lease is left to expire
            task = by_digest[digest]
            await stub.CompleteTask(
                worker_pb2.CompleteTaskRequest(
                    worker_id=worker_id,
                    task_id=task.task_id,
                    lease_token=task.lease_token,
                    response=re_pb2.ExecuteResponse(
                        result=re_pb2.ActionResult(exit_code=0),
                        status=status_pb2.Status(code=code_pb2.OK),
                    ),
                )
            )
        # A finished action asked again: answered from the action cache.
        hit_stream, _ = await start_execute(channel, digests[0])
        await hit_stream
        ac = re_grpc.ActionCacheStub(channel)
        await ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=digests[1].to_proto()))
        with pytest.raises(grpc.aio.AioRpcError):
            await ac.GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=digests[2].to_proto())
            )

        async def requeued():
            return await pool.fetchval("SELECT count(*) FROM task_events WHERE event='requeued'")

        await wait_until(requeued, what="the reaper to requeue task c")

        async def settled():
            after = await asyncio.to_thread(scrape, port)
            queued = await pool.fetchval("SELECT count(*) FROM tasks WHERE state = 'queued'")
            gauge = total(after, "expbuild_queue_depth", state="queued", platform=LINUX)
            files, _ = blob_files(server.store.blob_dir)
            blobs = total(after, "expbuild_cas_store_blobs")
            return after if gauge == queued == 1 and blobs == files else None

        after = await wait_until(settled, what="the gauges to catch up with SQL")
        for task, _name in streams:
            task.cancel()

    finished = await pool.fetch(
        "SELECT extract(epoch FROM leased_at - queued_at) AS wait,"
        "       extract(epoch FROM completed_at - leased_at) AS run,"
        "       extract(epoch FROM completed_at - queued_at) AS total "
        "FROM tasks WHERE state IN ('completed', 'failed')"
    )
    assert len(finished) == 2
    for name, column in (("queue_wait", "wait"), ("execution", "run"), ("total", "total")):
        metric = f"expbuild_task_{name}_seconds"
        labels = {"platform": LINUX, "instance": ""}
        assert delta(before, after, f"{metric}_count", **labels) == len(finished)
        expected = sum(float(row[column]) for row in finished)
        assert delta(before, after, f"{metric}_sum", **labels) == pytest.approx(expected, abs=1e-3)
        # Every finished task falls in the +Inf bucket.
        assert delta(before, after, f"{metric}_bucket", le="+Inf", **labels) == len(finished)

    tasks_count = await pool.fetchval("SELECT count(*) FROM tasks")
    task_operations = await pool.fetchval(
        "SELECT count(*) FROM operations WHERE task_id IS NOT NULL"
    )
    cached_operations = await pool.fetchval("SELECT count(*) FROM operations WHERE task_id IS NULL")
    assert delta(before, after, "expbuild_execute_requests_total", outcome="joined") == (
        task_operations - tasks_count
    )
    assert delta(before, after, "expbuild_execute_requests_total", outcome="queued") == tasks_count
    assert (
        delta(before, after, "expbuild_action_cache_lookups_total", method="Execute", result="hit")
        == cached_operations
        == 1
    )
    assert delta(
        before, after, "expbuild_action_cache_lookups_total", method="Execute", result="miss"
    ) == len(streams)
    for result in ("hit", "miss"):
        assert (
            delta(
                before,
                after,
                "expbuild_action_cache_lookups_total",
                method="GetActionResult",
                result=result,
            )
            == 1
        )

    reasons = await pool.fetch(
        "SELECT detail->>'reason' AS reason, count(*) AS n FROM task_events "
        "WHERE event IN ('lease-expired', 'heartbeat-missed') GROUP BY 1"
    )
    assert reasons
    for row in reasons:
        assert (
            delta(before, after, "expbuild_lease_expiries_total", reason=row["reason"]) == row["n"]
        )
    requeues = await pool.fetchval("SELECT count(*) FROM task_events WHERE event = 'requeued'")
    assert delta(before, after, "expbuild_task_requeues_total") == requeues

    files, size = blob_files(server.store.blob_dir)
    assert total(after, "expbuild_cas_store_blobs") == files
    assert total(after, "expbuild_cas_store_bytes") == size > 0


async def test_two_replicas_report_the_same_queue_gauges(database_url, pool, tmp_path):
    """The gauges come from SQL, so separate replica processes agree with each other and
    with the database, per platform."""
    for platform in ({"OSFamily": ["linux"]}, {"OSFamily": ["windows"]}):
        for index in range(3 if platform["OSFamily"] == ["linux"] else 2):
            await queue.enqueue(
                pool,
                queue.NewTask("", digest_of(f"{platform}{index}".encode()), platform),
                f"op-{platform['OSFamily'][0]}-{index}",
            )
    replicas, ports = [], []
    try:
        for name in ("replica-a", "replica-b"):
            env = processes.server_env(database_url, tmp_path)
            replica = processes.start(name, ["expbuild", "server"], tmp_path, env)
            replicas.append(replica)
            processes.wait_healthy(env["EXPBUILD_SERVER__ADDRESS"], replica)
            ports.append(int(env["EXPBUILD_SERVER__METRICS_ADDRESS"].rsplit(":", 1)[1]))
        expected = {
            (row["platform"], row["n"])
            for row in await pool.fetch(
                "SELECT platform::text AS platform, count(*) AS n FROM tasks "
                "WHERE state = 'queued' GROUP BY 1"
            )
        }
        assert len(expected) == 2

        async def agree():
            seen = []
            for port in ports:
                samples = await asyncio.to_thread(scrape, port)
                seen.append(
                    (
                        total(samples, "expbuild_queue_depth", state="queued", platform=LINUX),
                        total(
                            samples,
                            "expbuild_queue_depth",
                            state="queued",
                            platform="OSFamily=windows",
                        ),
                        total(samples, "expbuild_tasks_queued"),
                    )
                )
            return seen if seen[0] == seen[1] == (3, 2, 5) else None

        assert await wait_until(agree, what="both replicas to report 3 Linux and 2 Windows tasks")
    finally:
        for replica in replicas:
            replica.stop()


async def _worker_input_action(store, argv, payload: bytes) -> tuple[Digest, int]:
    """An action whose input root holds one file, `input.txt`; and the root's size."""
    file_digest = digest_of(payload)
    await store.put(file_digest, payload)
    root = re_pb2.Directory(
        files=[re_pb2.FileNode(name="input.txt", digest=file_digest.to_proto())]
    )
    command = re_pb2.Command(arguments=list(argv))
    command.platform.properties.add(name="OSFamily", value="Linux")
    blobs = [root.SerializeToString(), command.SerializeToString()]
    for data in blobs:
        await store.put(digest_of(data), data)
    action = re_pb2.Action(
        input_root_digest=digest_of(blobs[0]).to_proto(),
        command_digest=digest_of(blobs[1]).to_proto(),
    ).SerializeToString()
    await store.put(digest_of(action), action)
    return digest_of(action), len(blobs[0])


async def test_worker_serves_its_own_metrics(database_url, tmp_path):
    """`expbuild worker daemon` with `[worker] metrics_address`: running actions, the input
    cache's hits, misses and ratio, bytes fetched and the backend's launch time."""
    settings = server_settings(tmp_path / "cas")
    async with running_server(settings, database_url) as app:
        metrics_port = free_port()
        env = {
            "EXPBUILD_WORKER__SERVER_URL": f"http://127.0.0.1:{app.port}",
            "EXPBUILD_WORKER__METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
            "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(tmp_path / "work"),
            "EXPBUILD_WORKER__PLATFORM__OSFAMILY": "Linux",
            # pytest's tmp tree is root's alone, so actions cannot run as nobody there.
            "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",
        }
        worker = processes.start("worker", ["expbuild-worker", "daemon"], tmp_path, env)
        try:

            async def registered():
                return await asyncio.to_thread(
                    lambda: "registered" in worker.log() or worker.popen.poll() is not None
                )

            await wait_until(registered, what="the worker to register")
            assert worker.popen.poll() is None, worker.log()
            payload = b"some input bytes\n" * 100
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                for argv in (("cat", "input.txt"), ("wc", "-c", "input.txt")):
                    digest, root_size = await _worker_input_action(app.store, argv, payload)
                    reader, _ = await start_execute(channel, digest)
                    await asyncio.wait_for(reader, 60)

            async def idle():
                # The client hears of the result before the worker's report call returns
                # and the action leaves its running set: wait for that, not for a time.
                samples = await asyncio.to_thread(scrape, metrics_port)
                return samples if total(samples, "expbuild_worker_running_actions") == 0 else None

            samples = await wait_until(idle, what="the worker to finish reporting")
        finally:
            assert worker.stop() == 0, worker.log()
    # The first action fetched its input root (the root Directory and input.txt) into the
    # cache; the second, with the same input root, found both there.
    assert total(samples, "expbuild_worker_input_cache_misses_total") == 2
    assert total(samples, "expbuild_worker_input_cache_hits_total") == 2
    assert total(samples, "expbuild_worker_input_cache_hit_ratio") == 0.5
    assert total(samples, "expbuild_worker_fetched_bytes_total") == len(payload) + root_size
    assert total(samples, "expbuild_worker_backend_launch_seconds_count") == 2
    assert total(samples, "expbuild_worker_input_fetch_seconds_count") == 2
    assert total(samples, "expbuild_worker_running_actions") == 0


def _held_port():
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


@pytest.mark.parametrize(
    ("variable", "key"),
    [
        ("EXPBUILD_SERVER__ADDRESS", "[server] address"),
        ("EXPBUILD_SERVER__METRICS_ADDRESS", "[server] metrics_address"),
    ],
)
def test_a_port_in_use_ends_server_start_up_with_one_line(database_url, tmp_path, variable, key):
    import subprocess

    holder, port = _held_port()
    with holder:
        env = {**os.environ, **processes.server_env(database_url, tmp_path)}
        env[variable] = f"127.0.0.1:{port}"
        done = subprocess.run(
            [str(processes.BIN / "expbuild"), "server"], env=env, capture_output=True, timeout=60
        )
    stderr = done.stderr.decode()
    assert done.returncode != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: configuration error: {key} 127.0.0.1:{port} is already in use"]


def test_a_port_in_use_ends_worker_start_up_with_one_line(tmp_path):
    import subprocess

    holder, port = _held_port()
    with holder:
        env = {
            **os.environ,
            "EXPBUILD_WORKER__METRICS_ADDRESS": f"127.0.0.1:{port}",
            "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(tmp_path / "work"),
            "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",
        }
        done = subprocess.run(
            [str(processes.BIN / "expbuild-worker"), "daemon"],
            env=env,
            capture_output=True,
            timeout=60,
        )
    stderr = done.stderr.decode()
    assert done.returncode != 0 and "Traceback" not in stderr
    assert (
        f"Error: configuration error: [worker] metrics_address 127.0.0.1:{port} is already in use"
        in stderr
    )
