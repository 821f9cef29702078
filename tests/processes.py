"""Real ExpBuild processes for end-to-end tests: start, wait until healthy, stop, show logs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.postgres import free_port

BIN = Path(sys.executable).parent


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    env: dict = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def start(name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> Process:
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, **env}
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT, env=full_env
        )
    return Process(name, popen, log_path, env)


def server_env(database_url: str, tmp: Path, port: int | None = None) -> dict[str, str]:
    return {
        "EXPBUILD_DATABASE__URL": database_url,
        "EXPBUILD_SERVER__ADDRESS": f"127.0.0.1:{port or free_port()}",
        "EXPBUILD_SERVER__METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        "EXPBUILD_CAS__ROOT": str(tmp / "cas"),
    }


def wait_healthy(address: str, process: Process, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise AssertionError(f"{process.name} exited early:\n{process.log()}")
            with contextlib.suppress(grpc.RpcError):  # not listening yet
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise AssertionError(f"{process.name} not healthy after {timeout}s:\n{process.log()}")


def wait_for_log(process: Process, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in process.log():
            return
        if process.popen.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{process.name} never logged {text!r}:\n{process.log()}")


@contextlib.contextmanager
def expbuild_up(workers: int = 1) -> Iterator[tuple[Process, Path, str]]:
    """`expbuild up` in a fresh home with its embedded PostgreSQL, healthy and with its
    workers registered: (process, home, address). Killed and its home removed after the
    block; a test that checks how it stops stops it first."""
    # Not under pytest's 0700 tmp tree: as root the embedded server runs as another user,
    # and must reach its data dir without anyone loosening permissions.
    home = Path(tempfile.mkdtemp(prefix="expbuild-up-"))
    home.chmod(0o755)
    address = f"127.0.0.1:{free_port()}"
    env = {
        "EXPBUILD_HOME": str(home),
        "EXPBUILD_SERVER__METRICS_ADDRESS": "",
        "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(home / "work"),
    }
    up = start("up", ["expbuild", "up", "--workers", str(workers), "--address", address], home, env)
    try:
        wait_healthy(address, up, timeout=120)
        wait_for_log(up, "registered successfully")
        yield up, home, address
    finally:
        up.stop(signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
