"""Shared fixtures: a real PostgreSQL for the session, a fresh migrated database per test,
and a client channel to whatever `server` fixture a test file defines."""

from __future__ import annotations

import asyncio
import itertools
import os
from urllib.parse import urlparse, urlunparse

import asyncpg
import pytest

from expbuild.client.channel import open_channel
from expbuild.db.migrate import migrate
from expbuild.db.pool import create_pool
from tests.figures import write_summary
from tests.postgres import LocalPostgres, find_postgres, postgres_bindir

TEMPLATE = "expbuild_template"

# `expbuild server` started by a test runs one replica process, as the tests were written
# for; the default (one per core) and N are tests/test_server_processes.py's business.
os.environ.setdefault("EXPBUILD_SERVER__PROCESSES", "1")
_counter = itertools.count()


def with_database(url: str, database: str) -> str:
    parts = urlparse(url)
    return urlunparse(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def postgres_admin_url():
    with find_postgres() as (source, url):
        os.environ.setdefault("EXPBUILD_TEST_POSTGRES_SOURCE", source)
        asyncio.run(_build_template(url))
        yield url


async def _build_template(admin_url: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        await conn.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await conn.close()
    conn = await asyncpg.connect(with_database(admin_url, TEMPLATE))
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def _admin(admin_url: str, statement: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def create_from_template(admin_url: str, name: str) -> str:
    """A new database `name`, a clone of the migrated template; its URL."""
    await _admin(admin_url, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    return with_database(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    await _admin(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def database_url(postgres_admin_url):
    """A fresh database cloned from the migrated template; dropped after the test."""
    name = f"expbuild_test_{os.getpid()}_{next(_counter)}"
    yield await create_from_template(postgres_admin_url, name)
    await drop_database(postgres_admin_url, name)


@pytest.fixture
async def channel(server):
    """A client channel to the test file's own `server` fixture (a ServerApp)."""
    async with open_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture
async def pool(database_url):
    pool = await create_pool(database_url, min_size=1, max_size=20)
    yield pool
    await pool.close()


@pytest.fixture
async def restartable_postgres():
    """A migrated PostgreSQL of this test's own (`.url`), which it may stop, start and
    restart (`pg_ctl restart -m fast`)."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("needs the machine's PostgreSQL binaries (postgresql-15)")
    cluster = LocalPostgres(bindir)
    await asyncio.to_thread(cluster.init_and_start)
    conn = await asyncpg.connect(cluster.url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.remove)


def pytest_terminal_summary(terminalreporter):
    write_summary(terminalreporter)  # the figures tests measured (tests/figures.py)
