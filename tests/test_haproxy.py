"""Several replicas behind a real load balancer (issue #9.6): HAProxy (h2c, as in
docker/haproxy/haproxy.cfg) in front of two `expbuild server` processes on loopback; Bazel
builds tests/bazel/workspace through HAProxy while a fault hits mid-build, and the build
must succeed with the right outputs:

- one replica is killed with SIGKILL (the replica that received the build's first action);
- PostgreSQL restarts (`pg_ctl restart -m fast`).

The worker is given both replicas (`[worker] server_url` as a list) and moves to the one
left. Bazel is found as in tests/test_bazel.py; without it (or HAProxy) the tests skip.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.postgres import free_port
from tests.processes import Process, server_env, start, wait_for_log, wait_healthy
from tests.test_bazel import TARGET, Bazel, check_every_output, copy_tree, find_bazel, mode_flags

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

HAPROXY_CONFIG = """
global
    log stdout format raw local0 info

defaults
    mode http
    log global
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    # A request whose replica died before answering goes to the other one.
    retries 3
    option redispatch

frontend grpc
    bind 127.0.0.1:{port} proto h2
    default_backend replicas

backend replicas
    balance roundrobin
    server replica-1 127.0.0.1:{one} proto h2 check inter 500ms fall 1 rise 2
    server replica-2 127.0.0.1:{two} proto h2 check inter 500ms fall 1 rise 2
"""


@pytest.fixture
def bazel_path() -> str:
    return find_bazel()


class Stack:
    def __init__(self, database_url: str, folder: Path):
        if shutil.which("haproxy") is None:
            pytest.skip("haproxy is not installed")
        self.folder = folder
        self.ports = [free_port(), free_port()]
        self.replicas: list[Process] = []
        for n, port in enumerate(self.ports, 1):
            env = server_env(database_url, folder, port)  # one CAS directory for both
            self.replicas.append(start(f"replica-{n}", ["expbuild", "server"], folder, env))
            wait_healthy(env["EXPBUILD_SERVER__ADDRESS"], self.replicas[-1])
        self.port = free_port()
        config = folder / "haproxy.cfg"
        config.write_text(
            HAPROXY_CONFIG.format(port=self.port, one=self.ports[0], two=self.ports[1])
        )
        log = open(folder / "haproxy.log", "wb")  # noqa: SIM115 - closed in stop()
        self.haproxy = subprocess.Popen(
            ["haproxy", "-W", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        self._haproxy_log = log
        replicas = ",".join(f"http://127.0.0.1:{p}" for p in self.ports)
        self.worker = start(
            "worker",
            ["expbuild", "worker", "daemon"],
            folder,
            {
                "EXPBUILD_WORKER__SERVER_URL": replicas,
                "EXPBUILD_WORKER__MAX_CONCURRENT_TASKS": "8",
                "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(folder / "work"),
                "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",  # pytest's tmp tree is root's
            },
        )
        wait_for_log(self.worker, "registered successfully")
        wait_healthy(f"127.0.0.1:{self.port}", self.replicas[0])  # through HAProxy

    def stop(self) -> None:
        self.worker.stop()
        for replica in self.replicas:
            replica.stop()
        self.haproxy.terminate()
        self.haproxy.wait(timeout=10)
        self._haproxy_log.close()

    def logs(self) -> str:
        parts = [f"--- {p.name} ---\n{p.log()[-6000:]}" for p in (*self.replicas, self.worker)]
        parts.append(f"--- haproxy ---\n{(self.folder / 'haproxy.log').read_text()[-3000:]}")
        return "\n".join(parts)


def build_with_fault(stack: Stack, bazel_exe: str, folder: Path, fault) -> None:
    bazel = Bazel(bazel_exe, copy_tree(folder / "bazel"), folder)
    flags = mode_flags("remote_executor", stack.port) + ["--remote_retries=10"]
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            build = pool.submit(bazel.run, "build", *flags, TARGET)
            fault()
            result = build.result(timeout=900)
        assert result.returncode == 0, f"{result.describe()}\n{stack.logs()}"
        check_every_output(bazel, flags)
    finally:
        bazel.shutdown()


def first_to_queue(stack: Stack, timeout: float = 300) -> int:
    """The index of the replica that queued the build's first action."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for n, replica in enumerate(stack.replicas):
            if "submitted to queue" in replica.log():
                return n
        time.sleep(0.1)
    raise AssertionError(f"no action reached a replica:\n{stack.logs()}")


def test_bazel_through_haproxy_survives_a_killed_replica(
    bazel_path, restartable_postgres, tmp_path
):
    stack = Stack(restartable_postgres.url, tmp_path)
    try:

        def kill_the_busy_replica() -> None:
            victim = stack.replicas[first_to_queue(stack)]
            victim.stop(signal.SIGKILL)

        build_with_fault(stack, bazel_path, tmp_path, kill_the_busy_replica)
    finally:
        stack.stop()


def test_bazel_through_haproxy_survives_a_postgres_restart(
    bazel_path, restartable_postgres, tmp_path
):
    stack = Stack(restartable_postgres.url, tmp_path)
    try:

        def restart_postgres() -> None:
            first_to_queue(stack)
            restartable_postgres.restart()

        build_with_fault(stack, bazel_path, tmp_path, restart_postgres)
    finally:
        stack.stop()
