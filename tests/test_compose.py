"""docker/: the images, the compose file end to end, and testcontainers on the local image.

A module fixture runs `docker/build.sh` (it keeps images that exist, so only the first run
on a machine pays for the build), then brings `docker/compose.yaml` up with an override in
which every container uses the host's network and listens on free 127.0.0.1 ports only:
PostgreSQL, the migration job, two server replicas, HAProxy in front of them, two workers
(sandbox backend) and Prometheus. Through HAProxy, `expbuild run` and a Bazel build
(tests/test_bazel.py's workspace) run on the workers; Prometheus's HTTP API then has to
report the queue gauges of both replicas and the Execute requests they served. Everything
is torn down (volumes included) at the end.

Without a Docker engine, docker-compose or mmdebstrap these tests are skipped, except under
CI=true, where they fail (.ci/run installs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from expbuild.db.migrate import migrate
from tests.docker_engine import EngineUnavailable, docker_engine
from tests.postgres import LOCAL_POSTGRES_IMAGE, free_port, from_testcontainers
from tests.serving import running_server, running_worker, server_settings
from tests.test_bazel import TARGET, Bazel, check_every_output, copy_tree, find_bazel, mode_flags

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

DOCKER = Path(__file__).resolve().parent.parent / "docker"
IMAGES = (
    "expbuild:latest",
    LOCAL_POSTGRES_IMAGE,
    "expbuild-haproxy:latest",
    "expbuild-prometheus:latest",
)
CLI = Path(sys.executable).parent / "expbuild"


def _unavailable(message: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; the compose tests may not be skipped in CI")
    pytest.skip(message)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The machine's Docker engine, or one started for this module (and stopped after)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(docker_engine(tmp_path_factory.mktemp("dockerd")))
        except EngineUnavailable as exc:
            _unavailable(str(exc))
        yield


@pytest.fixture(scope="module")
def images(engine) -> dict[str, float]:
    """The images built by docker/build.sh; returns each image's size in MB."""
    built = subprocess.run([str(DOCKER / "build.sh")], capture_output=True, text=True, timeout=1200)
    if built.returncode != 0 and shutil.which("mmdebstrap") is None:
        _unavailable("docker/build.sh needs mmdebstrap (apt-get install mmdebstrap)")
    assert built.returncode == 0, built.stdout + built.stderr
    print(built.stdout)
    sizes = {}
    for image in IMAGES:
        size = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Size}}", image],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sizes[image] = int(size) / 1e6
    return sizes


def test_images_are_built_from_debian_and_cached(images):
    again = subprocess.run([str(DOCKER / "build.sh")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("exists, kept") == len(IMAGES) + 1, again.stdout  # + the base
    release = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "cat", "expbuild:latest", "/etc/os-release"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Debian" in release
    tools = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--entrypoint",
            "sh",
            "expbuild:latest",
            "-c",
            "for c in expbuild expbuild-worker bwrap; do command -v $c; done; expbuild-worker daemon --help",
        ],
        capture_output=True,
        text=True,
    )
    assert tools.returncode == 0 and "/usr/bin/bwrap" in tools.stdout, tools.stderr


# -- testcontainers -----------------------------------------------------------------------------


async def test_testcontainers_runs_the_local_postgres_image(images, tmp_path):
    """tests/postgres.py's testcontainers source, on the image docker/build.sh makes."""
    with from_testcontainers(LOCAL_POSTGRES_IMAGE) as url:
        assert url and url.startswith("postgresql://") and "@127.0.0.1:" in url
        conn = await asyncpg.connect(url)
        try:
            applied = await migrate(conn)
            assert [m.version for m in applied][:1] == [1]
            version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
        assert version.startswith("15.")
        # A replica and a worker on that database run an action end to end.
        async with running_server(server_settings(tmp_path / "cas"), url) as app:
            async with running_worker(app, tmp_path / "work"):
                ran = await asyncio.create_subprocess_exec(
                    str(CLI),
                    "run",
                    "--server",
                    f"127.0.0.1:{app.port}",
                    "--",
                    "sh",
                    "-c",
                    "echo via-testcontainers",
                    stdout=asyncio.subprocess.PIPE,
                    cwd=tmp_path,
                )
                out, _ = await asyncio.wait_for(ran.communicate(), 120)
        assert (ran.returncode, out) == (0, b"via-testcontainers\n")


# -- compose ------------------------------------------------------------------------------------


@dataclass
class Stack:
    project: str
    files: list[Path]
    grpc: int  # HAProxy
    prometheus: int
    replicas: list[tuple[int, int]]  # (gRPC, metrics) per replica
    up_seconds: float

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        files = [arg for f in self.files for arg in ("-f", str(f))]
        return subprocess.run(
            ["docker-compose", "-p", self.project, *files, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60").stdout


def _override(tmp: Path, pg: int, replicas, grpc: int, prometheus: int) -> Path:
    database = f"postgresql://expbuild:expbuild@127.0.0.1:{pg}/expbuild"
    host = {"network_mode": "host"}
    services: dict[str, dict] = {
        "postgres": {
            **host,
            "environment": {"PGPORT": str(pg)},
            "command": ["postgres", "-c", f"port={pg}", "-c", "listen_addresses=127.0.0.1"]
            + ["-c", "fsync=off", "-c", "synchronous_commit=off"],
        },
        "migrate": {**host, "environment": {"EXPBUILD_DATABASE__URL": database}},
        "haproxy": {
            **host,
            "environment": {
                "HAPROXY_BIND": f"127.0.0.1:{grpc}",
                "REPLICA_1": f"127.0.0.1:{replicas[0][0]}",
                "REPLICA_2": f"127.0.0.1:{replicas[1][0]}",
            },
        },
        "prometheus": {
            **host,
            "volumes": [f"{tmp / 'prometheus.yml'}:/etc/prometheus/prometheus.yml:ro"],
            "command": [f"--web.listen-address=127.0.0.1:{prometheus}"],
        },
    }
    for index, (grpc_port, metrics_port) in enumerate(replicas, start=1):
        services[f"server-{index}"] = {
            **host,
            "environment": {
                "EXPBUILD_DATABASE__URL": database,
                "EXPBUILD_SERVER__ADDRESS": f"127.0.0.1:{grpc_port}",
                "EXPBUILD_SERVER__METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
            },
        }
    worker_targets = []
    for index in (1, 2):
        worker_targets.append(f"127.0.0.1:{free_port()}")
        services[f"worker-{index}"] = {
            **host,
            "environment": {
                "EXPBUILD_WORKER__SERVER_URL": f"http://127.0.0.1:{grpc}",
                "EXPBUILD_WORKER__METRICS_ADDRESS": worker_targets[-1],
            },
        }
    targets = [f"127.0.0.1:{metrics}" for _, metrics in replicas]
    (tmp / "prometheus.yml").write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "expbuild-server", "static_configs": [{"targets": targets}]},
                    {
                        "job_name": "expbuild-worker",
                        "static_configs": [{"targets": worker_targets}],
                    },
                ],
            }
        )
    )
    path = tmp / "compose.test.yaml"
    path.write_text(json.dumps({"services": services}, indent=1))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def stack(images, tmp_path_factory, request):
    if shutil.which("docker-compose") is None:
        _unavailable("docker-compose is not installed (apt-get install docker-compose)")
    tmp = tmp_path_factory.mktemp("compose")
    replicas = [(free_port(), free_port()), (free_port(), free_port())]
    grpc, prometheus, pg = free_port(), free_port(), free_port()
    override = _override(tmp, pg, replicas, grpc, prometheus)
    stack = Stack(
        f"expbuildtest{os.getpid()}",
        [DOCKER / "compose.yaml", override],
        grpc,
        prometheus,
        replicas,
        0.0,
    )
    failed_before = request.session.testsfailed
    started = time.monotonic()
    try:
        up = stack.compose("up", "-d", "--no-build", timeout=600)
        assert up.returncode == 0, up.stderr + stack.logs()
        _wait_for_workers(stack, 2, timeout=120)
        stack.up_seconds = time.monotonic() - started
        print(f"[compose] up with two online workers in {stack.up_seconds:.1f}s")
        yield stack
    finally:
        if request.session.testsfailed > failed_before:
            print(stack.logs())
        down = stack.compose("down", "-v", "--remove-orphans", "--timeout", "20")
        assert down.returncode == 0, down.stderr


def _wait_for_workers(stack: Stack, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    listed = None
    while time.monotonic() < deadline:
        listed = subprocess.run(
            [str(CLI), "workers", "list", "--json", "--server", f"127.0.0.1:{stack.grpc}"],
            capture_output=True,
            text=True,
        )
        if listed.returncode == 0:
            workers = json.loads(listed.stdout)
            if sum(1 for w in workers if w["state"] == "online") >= count:
                return
        time.sleep(0.5)
    raise AssertionError(
        f"{count} workers not online after {timeout}s: "
        f"{listed.stdout if listed else ''}{listed.stderr if listed else ''}\n{stack.logs()}"
    )


def _prometheus(stack: Stack, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{stack.prometheus}/api/v1/query?" + urllib.parse.urlencode(
        {"query": query}
    )
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait_for_prometheus(stack: Stack, query: str, accept, timeout: float = 90) -> list[dict]:
    """Poll a PromQL query until `accept(result)` holds; returns that result."""
    deadline = time.monotonic() + timeout
    result: list[dict] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            result = _prometheus(stack, query)
            if accept(result):
                return result
        time.sleep(0.5)
    raise AssertionError(f"Prometheus: {query} never matched, last {result}\n{stack.logs()}")


def test_expbuild_run_through_haproxy(stack: Stack, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("compose input\n")
    ran = subprocess.run(
        [str(CLI), "run", "--server", f"127.0.0.1:{stack.grpc}", "--json", "--input", "in"]
        + ["--no-cache", "--", "sh", "-c", "cat in/a.txt; cat /proc/1/comm; exit 4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr + stack.logs()
    report = json.loads(ran.stdout)
    assert report["exit_code"] == 4 and report["worker"], report
    # In the sandbox backend the action is pid 1's child in its own pid namespace, not
    # in the container's (whose pid 1 is tini).
    assert report["stdout"].startswith("compose input\n"), report
    assert "tini" not in report["stdout"], report


def test_bazel_build_through_haproxy(stack: Stack, tmp_path):
    bazel = Bazel(find_bazel(), copy_tree(tmp_path / "bazel"), tmp_path)
    flags = mode_flags("remote_executor", stack.grpc)
    try:
        result = bazel.run("build", *flags, TARGET)
        assert result.returncode == 0, result.describe() + stack.logs()
        _, kinds = result.summary()
        executed = {k: n for k, n in kinds.items() if k != "internal"}
        assert set(executed) == {"remote"} and executed["remote"] >= 34, kinds
        check_every_output(bazel, flags)
    finally:
        bazel.shutdown()
    # Both workers took part (actions are spread over whoever polls first).
    listed = subprocess.run(
        [str(CLI), "workers", "list", "--json", "--server", f"127.0.0.1:{stack.grpc}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(json.loads(listed.stdout)) == 2


def test_prometheus_scrapes_both_replicas(stack: Stack, tmp_path):
    ran = subprocess.run(
        [str(CLI), "run", "--server", f"127.0.0.1:{stack.grpc}", "--", "echo", "scraped"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.stdout == "scraped\n", ran.stderr
    # The queue gauges come from Postgres, so both replicas report them, and (once the
    # queue is still: each replica samples it at its own moment) the same value.
    replicas = {f"127.0.0.1:{metrics}" for _, metrics in stack.replicas}
    _wait_for_prometheus(
        stack,
        "expbuild_tasks_queued",
        lambda r: (
            {s["metric"]["instance"] for s in r} == replicas and {s["value"][1] for s in r} == {"0"}
        ),
    )
    # Every worker serves its own metrics too, and Prometheus scrapes both.
    _wait_for_prometheus(
        stack,
        'expbuild_worker_running_actions{job="expbuild-worker"}',
        lambda r: len(r) == 2,
    )
    # Work went through HAProxy to the replicas: their Execute counters add up to it.
    _wait_for_prometheus(
        stack,
        "sum(expbuild_execute_requests_total)",
        lambda r: r and float(r[0]["value"][1]) >= 1,
    )
    print(f"[compose] start-up to two online workers: {stack.up_seconds:.1f}s")
