"""Bazel against a server with [auth] mode = "tokens" (issue #8, "done when").

A token for Bazel and one for the worker come from `expbuild tokens create`. Bazel builds
the conformance workspace with `--remote_header=authorization=Bearer …`; the same build
without the header fails with UNAUTHENTICATED. Three routes:

- `grpc`: plain gRPC on loopback;
- `grpcs`: TLS with a certificate from a CA made at test time, Bazel given
  `--tls_certificate=ca.pem`. Debian's bazel-bootstrap 4.2.3 bundles a netty whose JDK TLS
  provider lacks ALPN, so it crashes before connecting to any grpcs:// endpoint ("JDK
  provider does not support ALPN protocol" in its java.log); this case is skipped, naming
  that, when it happens, and runs in full with a Bazel that can do TLS (EXPBUILD_TEST_BAZEL).
- `grpcs-via-haproxy`: the same TLS server, reached the way docs/security.md tells users of
  such a Bazel to: Bazel speaks plain gRPC to a loopback HAProxy
  (configs/haproxy-bazel-tls.cfg), which opens TLS (ALPN h2, certificate and name checked
  against the test CA) to the server. This case runs with any Bazel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import create_from_template, drop_database
from tests.postgres import free_port
from tests.test_bazel import (
    TARGET,
    Bazel,
    Process,
    check_every_output,
    common_flags,
    copy_tree,
    expbuild_command,
    find_bazel,
    record_time,
    start,
    wait_for_log,
)
from tests.tls_certs import TestCA

HAPROXY_CONFIG = Path(__file__).parent.parent / "configs" / "haproxy-bazel-tls.cfg"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def create_token(env: dict[str, str], name: str, *scopes: str) -> str:
    done = subprocess.run(
        [*expbuild_command(), "tokens", "create", "--name", name, "--scope", ",".join(scopes),
         "--json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["secret"]


def wait_for_health(port: int, ca: Path | None, server: Process, timeout: float = 60) -> None:
    """Until the server (or the proxy `server` in front of it) answers health checks."""
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes()))
        if ca
        else grpc.insecure_channel(target)
    )
    deadline = time.monotonic() + timeout
    last = ""
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert server.proc.poll() is None, f"server exited:\n{server.tail()}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.2)
    raise AssertionError(f"{server.name} not healthy ({last}):\n{server.tail()}")


BAZEL_WITHOUT_ALPN = "JDK provider does not support ALPN protocol"


def skip_if_bazel_cannot_do_tls(bazel: Bazel) -> None:
    """Skip, naming the cause, when this Bazel crashed because its netty has no ALPN."""
    for log in (bazel.root / "output_user_root").glob("*/java.log"):
        if BAZEL_WITHOUT_ALPN in log.read_text(errors="replace"):
            pytest.skip(
                f"this Bazel cannot open any grpcs:// connection ({BAZEL_WITHOUT_ALPN!r} in "
                f"{log}): Debian's bazel-bootstrap bundles a netty without JDK ALPN"
            )


@pytest.fixture(scope="module")
def bazel_exe() -> str:
    return find_bazel()


def start_tls_proxy(server_port: int, ca: Path, folder: Path) -> tuple[Process, int]:
    """HAProxy from configs/haproxy-bazel-tls.cfg: plain gRPC in, TLS to the server out.

    Returns the process and the loopback port it takes plain gRPC on."""
    haproxy = shutil.which("haproxy")
    if not haproxy:
        message = "haproxy not found: `apt-get install -y haproxy`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; the TLS route for Bazel may not be skipped in CI")
        pytest.skip(message)
    port = free_port()
    env = {
        **os.environ,
        "HAPROXY_BIND": f"127.0.0.1:{port}",
        "EXPBUILD_SERVER": f"127.0.0.1:{server_port}",
        "EXPBUILD_SERVER_NAME": "localhost",  # the name in the test certificate
        "EXPBUILD_TLS_CA": str(ca),
    }
    log = folder / "haproxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(HAPROXY_CONFIG)],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return Process("haproxy", proc, log), port


@pytest.fixture(scope="module")
def secured_cluster(request, postgres_admin_url, tmp_path_factory):
    scheme = request.param
    folder = tmp_path_factory.mktemp(f"expbuild-bazel-{scheme}")
    ca = TestCA(folder / "pki")
    cert = ca.issue("server", "localhost", server=True)
    tls = (
        {"EXPBUILD_SERVER__TLS_CERT": str(cert.cert), "EXPBUILD_SERVER__TLS_KEY": str(cert.key)}
        if scheme == "grpcs"
        else {}
    )
    name = f"expbuild_bazel_{scheme}_{os.getpid()}"
    database_url = asyncio.run(create_from_template(postgres_admin_url, name))
    port = free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("EXPBUILD_")}
    database = {"EXPBUILD_DATABASE__URL": database_url}
    processes: list[Process] = []
    try:
        bazel_token = create_token({**base_env, **database}, "bazel", "cas:read", "cas:write",
                                   "execute")  # fmt: skip
        worker_token = folder / "worker.token"
        worker_token.write_text(create_token({**base_env, **database}, "worker-1", "worker"))
        server = start(
            "server",
            ["server"],
            {
                **base_env,
                **database,
                "EXPBUILD_SERVER__ADDRESS": f"127.0.0.1:{port}",
                "EXPBUILD_SERVER__METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
                **tls,
                "EXPBUILD_AUTH__MODE": "tokens",
                "EXPBUILD_CAS__ROOT": str(folder / "cas"),
            },
            folder,
        )
        processes.append(server)
        wait_for_health(port, ca.pem if tls else None, server)
        worker = start(
            "worker",
            ["worker", "daemon", "--server", f"{scheme}://127.0.0.1:{port}"],
            {
                **base_env,
                "EXPBUILD_WORKER__MAX_CONCURRENT_TASKS": "8",
                "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(folder / "work"),
                "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",  # pytest's tmp tree is root's alone
                **({"EXPBUILD_WORKER__TLS_CA": str(ca.pem)} if tls else {}),
                "EXPBUILD_WORKER__TOKEN_FILE": str(worker_token),
            },
            folder,
        )
        processes.append(worker)
        wait_for_log(worker, "registered successfully")
        proxy_port = None
        if tls:
            proxy, proxy_port = start_tls_proxy(port, ca.pem, folder)
            processes.append(proxy)
            wait_for_health(proxy_port, None, proxy)  # the whole way: plain in, TLS out
        yield scheme, port, proxy_port, ca.pem, bazel_token, processes
    finally:
        for process in reversed(processes):
            process.stop()
        with contextlib.suppress(Exception):
            asyncio.run(drop_database(postgres_admin_url, name))


@pytest.mark.parametrize(
    ("secured_cluster", "route"),
    [("grpc", "grpc"), ("grpcs", "grpcs"), ("grpcs", "grpcs-via-haproxy")],
    indirect=["secured_cluster"],
    scope="module",
)
def test_bazel_builds_over_grpcs_with_a_token_and_not_without(
    bazel_exe, secured_cluster, route, tmp_path
):
    scheme, port, proxy_port, ca, token, processes = secured_cluster
    logs = "\n".join(f"--- {p.name} ---\n{p.tail(60)}" for p in processes)
    bazel = Bazel(bazel_exe, copy_tree(tmp_path / "bazel"), tmp_path)
    endpoint = {
        "grpc": f"grpc://127.0.0.1:{port}",
        "grpcs": f"grpcs://127.0.0.1:{port}",
        "grpcs-via-haproxy": f"grpc://127.0.0.1:{proxy_port}",
    }[route]
    remote = [
        f"--remote_executor={endpoint}",
        *([f"--tls_certificate={ca}"] if route == "grpcs" else []),
        "--spawn_strategy=remote",
        # A key per route: one route's results must not be another's cache hits.
        *common_flags(f"tokens_{route}"),
    ]
    try:
        authorized = [*remote, f"--remote_header=authorization=Bearer {token}"]
        built = bazel.run("build", *authorized, TARGET)
        if built.returncode != 0 and route == "grpcs":
            skip_if_bazel_cannot_do_tls(bazel)
        assert built.returncode == 0, f"{built.describe()}\n{logs}"
        record_time(f"tokens, {route}: build", built.wall, built.elapsed())
        _, kinds = built.summary()
        assert {k for k in kinds if k != "internal"} == {"remote"}, kinds
        check_every_output(bazel, authorized)

        assert bazel.run("clean").returncode == 0
        refused = bazel.run("build", *remote, TARGET)
        assert refused.returncode != 0, refused.describe()
        assert "UNAUTHENTICATED" in refused.output, refused.describe()
        record_time(f"tokens, {route}: build without the header", refused.wall, refused.elapsed())
    finally:
        bazel.shutdown()
