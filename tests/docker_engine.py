"""A real Docker engine for the docker backend's tests, and a tiny image to run.

`docker_engine()` reuses an engine that answers `docker info`; otherwise, as root with
`dockerd` installed (Debian: apt-get install docker.io busybox-static), it starts one in
the background and stops it again at the end of the session. The test image is built
from the static busybox binary (no registry is needed, none is contacted):
`/bin/busybox` plus a symlink per applet, imported with `docker import`.

Either returns an `Engine` or raises `EngineUnavailable` with the reason to skip.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TEST_IMAGE = "expbuild-test-busybox:latest"
START_TIMEOUT = 60.0


class EngineUnavailable(Exception):
    """No Docker engine can be used here; the message says why."""


@dataclass
class Engine:
    started_here: bool
    start_seconds: float  # engine start (0 when reused)
    import_seconds: float  # test image import (0 when present)


def _docker(
    *args: str, input: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", *args], input=input, capture_output=True, timeout=timeout, check=False
    )


def _answers() -> bool:
    try:
        return _docker("info", "--format", "{{.ServerVersion}}", timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextmanager
def docker_engine(log_dir: Path) -> Iterator[Engine]:
    if shutil.which("docker") is None:
        raise EngineUnavailable("the docker CLI is not installed (apt-get install docker.io)")
    dockerd: subprocess.Popen | None = None
    start_seconds = 0.0
    if not _answers():
        dockerd, start_seconds = _start_dockerd(log_dir)
    try:
        import_seconds = _ensure_test_image()
        yield Engine(dockerd is not None, start_seconds, import_seconds)
    finally:
        if dockerd is not None:
            dockerd.send_signal(signal.SIGTERM)
            try:
                dockerd.wait(30)
            except subprocess.TimeoutExpired:
                dockerd.kill()
                dockerd.wait()


def _start_dockerd(log_dir: Path) -> tuple[subprocess.Popen, float]:
    binary = shutil.which("dockerd")
    if binary is None:
        raise EngineUnavailable(
            "no Docker engine answers `docker info` and dockerd is not installed "
            "(apt-get install docker.io)"
        )
    if os.geteuid() != 0:
        raise EngineUnavailable(
            "no Docker engine answers `docker info`, and only root may start dockerd"
        )
    log_path = log_dir / "dockerd.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        dockerd = subprocess.Popen(
            [binary], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    while time.monotonic() - started < START_TIMEOUT:
        if dockerd.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:]
            raise EngineUnavailable(f"dockerd exited with status {dockerd.returncode}: {tail}")
        if _answers():
            return dockerd, time.monotonic() - started
        time.sleep(0.2)
    dockerd.kill()
    dockerd.wait()
    raise EngineUnavailable(f"dockerd did not answer within {START_TIMEOUT:g}s (log: {log_path})")


def _ensure_test_image() -> float:
    if _docker("image", "inspect", TEST_IMAGE).returncode == 0:
        return 0.0
    started = time.monotonic()
    busybox = _static_busybox()
    applets = subprocess.run(
        [busybox, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for directory in ("bin", "tmp", "work"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in applets:
            if applet != "busybox":
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
    imported = _docker(
        "import", "--change", "ENV PATH=/bin", "-", TEST_IMAGE, input=archive.getvalue()
    )
    if imported.returncode != 0:
        raise EngineUnavailable(f"docker import failed: {imported.stderr.decode(errors='replace')}")
    return time.monotonic() - started


def _static_busybox() -> str:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(candidate):
            ldd = subprocess.run(["ldd", candidate], capture_output=True, text=True, check=False)
            if (
                "not a dynamic executable" in ldd.stdout + ldd.stderr
                or "statically linked" in ldd.stdout
            ):
                return candidate
    raise EngineUnavailable(
        "no static busybox to build the test image from (apt-get install busybox-static)"
    )
