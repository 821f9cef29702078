"""Packaging: the wheel alone is enough to migrate a database and run a worker on another host.

`python -m build` builds the sdist and, from it, the wheel; a clean virtualenv (no
checkout on its path, nothing but the wheel and its dependencies) then runs `expbuild db
migrate` against a fresh database and `expbuild-worker daemon` against a server replica
started from the checkout, and `expbuild run` from the same venv gets an action through.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import asyncpg
import pytest

from expbuild.db.migrate import available_migrations
from tests.conftest import with_database
from tests.postgres import free_port
from tests.processes import server_env, start, wait_for_log, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CHECKOUT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # Plain `python -m build`: the sdist first, then the wheel built from that sdist, so
    # both must carry the migrations.
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(CHECKOUT)],
        check=True,
        capture_output=True,
    )
    (sdist,) = out.glob("expbuild-*.tar.gz")
    with tarfile.open(sdist) as archive:
        assert any(n.endswith("/migrations/0001_initial.sql") for n in archive.getnames())
    (built,) = out.glob("expbuild-*.whl")
    return built


@pytest.fixture(scope="module")
def clean_venv(wheel, tmp_path_factory) -> Path:
    """A virtualenv holding only the wheel and its dependencies; returns its bin/."""
    root = tmp_path_factory.mktemp("clean-venv")
    venv.create(root, with_pip=True)
    subprocess.run(
        [str(root / "bin" / "pip"), "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
    )
    return root / "bin"


def outside_checkout(tmp_path: Path, **extra: str) -> dict:
    """An environment that cannot reach the checkout: no PYTHONPATH, run from elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(extra)
    env["HOME"] = str(tmp_path)
    return env


def test_wheel_carries_the_migrations(wheel):
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(n for n in archive.namelist() if n.startswith("expbuild/migrations/"))
    expected = [f"expbuild/migrations/{m.path.name}" for m in available_migrations()]
    assert shipped == expected


def test_installed_package_uses_its_own_migrations(clean_venv, tmp_path):
    found = subprocess.run(
        [
            str(clean_venv / "python"),
            "-c",
            "from expbuild.db.migrate import find_migrations_dir; print(find_migrations_dir())",
        ],
        cwd=tmp_path,
        env=outside_checkout(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(found).parent.parent.name == "site-packages", found


def test_wheel_migrates_a_database_and_runs_a_worker(clean_venv, postgres_admin_url, tmp_path):
    database = f"expbuild_wheel_{os.getpid()}"
    asyncio.run(_create_database(postgres_admin_url, database))
    url = with_database(postgres_admin_url, database)
    env = outside_checkout(tmp_path, EXPBUILD_DATABASE__URL=url)
    try:
        migrated = subprocess.run(
            [str(clean_venv / "expbuild"), "db", "migrate"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert migrated.returncode == 0, migrated.stderr
        names = [f"applied {m.version:04d}_{m.name}" for m in available_migrations()]
        assert migrated.stdout.splitlines() == names
        assert asyncio.run(_applied_versions(url)) == [m.version for m in available_migrations()]

        helped = subprocess.run(
            [str(clean_venv / "expbuild-worker"), "daemon", "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert helped.returncode == 0 and "--config" in helped.stdout, helped.stderr

        # A replica from the checkout; the worker and the client from the wheel's venv.
        port = free_port()
        server = start("server", ["expbuild", "server"], tmp_path, server_env(url, tmp_path, port))
        worker = None
        try:
            wait_healthy(f"127.0.0.1:{port}", server)
            worker_env = {
                **env,
                "EXPBUILD_WORKER__SERVER_URL": f"http://127.0.0.1:{port}",
                "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(tmp_path / "work"),
                "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",  # pytest's tmp tree is root's alone
            }
            with open(tmp_path / "wheel-worker.log", "wb") as log:
                worker = subprocess.Popen(
                    [str(clean_venv / "expbuild-worker"), "daemon"],
                    cwd=tmp_path,
                    env=worker_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            wait_for_log(server, "registered with platform")
            ran = subprocess.run(
                [
                    str(clean_venv / "expbuild"),
                    "run",
                    "--server",
                    f"127.0.0.1:{port}",
                    "--",
                    "sh",
                    "-c",
                    "echo from-the-wheel; exit 3",
                ],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert (ran.returncode, ran.stdout) == (3, "from-the-wheel\n"), ran.stderr
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(60)
            server.stop()
        assert worker.returncode == 0, (tmp_path / "wheel-worker.log").read_text()
    finally:
        asyncio.run(_drop_database(postgres_admin_url, database))


async def _create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()


async def _drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def _applied_versions(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    return [r["version"] for r in rows]


# -- systemd units ------------------------------------------------------------------------------

UNITS = CHECKOUT / "packaging" / "systemd"
# systemd-analyze's exposure score (0 = locked down, 10 = unprotected). The worker keeps
# namespaces, cgroup delegation and W^X off for its backends (see the unit's comments).
MAX_EXPOSURE = {"expbuild-server.service": 2.0, "expbuild-worker.service": 5.0}


def _unit_with_local_binary(unit: Path, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's expbuild, so verify finds a binary."""
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/expbuild/bin/expbuild", str(BIN_EXPBUILD)))
    return copy


BIN_EXPBUILD = Path(sys.executable).parent / "expbuild"


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_systemd_unit_verifies_and_is_hardened(name, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = _unit_with_local_binary(UNITS / name, tmp_path)
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE[name], security.stdout


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_systemd_unit_runs_a_real_command(name):
    """ExecStart names a command line the installed package accepts."""
    (exec_start,) = re.findall(r"^ExecStart=(.+)$", (UNITS / name).read_text(), re.M)
    argv = exec_start.split()
    assert argv[0] == "/opt/expbuild/bin/expbuild"
    config = argv.index("--config")
    helped = subprocess.run(
        [str(BIN_EXPBUILD), *argv[1:config], "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--config" in helped.stdout, helped.stderr
