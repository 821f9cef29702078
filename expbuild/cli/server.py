"""`expbuild server` (alias `re-server`) and `expbuild db migrate`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
from pathlib import Path

import click

from expbuild import aio
from expbuild.auth.exposure import check_exposure
from expbuild.cli.common import config_option, settings_or_exit, setup_logging, verbose_option
from expbuild.config import ConfigError, Settings, data_dir
from expbuild.db.pool import DatabaseUnavailable

log = logging.getLogger("expbuild.server")


def resolve_database_url(settings: Settings, stack: contextlib.ExitStack) -> str:
    """The configured database, or the embedded one started (and stopped) on `stack`."""
    if settings.database.url:
        return settings.database.url
    from expbuild.embedded import start_embedded_postgres

    folder = settings.database.embedded_data_dir or str(data_dir() / "postgres")
    log.info("No [database] url configured; using the embedded PostgreSQL")
    embedded = start_embedded_postgres(Path(folder))
    stack.callback(embedded.stop)
    return embedded.url


def _private_token_file(secret: str, stack: contextlib.ExitStack) -> str:
    """The in-process workers' token in a file only this user can read, removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="expbuild-local-workers-"))  # mode 0700
    stack.callback(shutil.rmtree, folder, True)
    path = folder / "token"
    path.touch(0o600)
    path.write_text(secret)
    return str(path)


async def serve(settings: Settings, database_url: str, *, local_workers: int = 0) -> None:
    """Run one replica (and optionally in-process workers) until SIGINT/SIGTERM."""
    with contextlib.ExitStack() as stack:
        await _serve(settings, database_url, local_workers, stack)


async def _serve(
    settings: Settings, database_url: str, local_workers: int, stack: contextlib.ExitStack
) -> None:
    from expbuild.server.app import ServerApp

    app = ServerApp(settings, database_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("Initializing remote worker scheduler...")
    agents, agent_tasks = [], []
    if local_workers:
        # Fail before serving anything if the configured backend cannot work here.
        from expbuild.worker.executor import make_executor

        await make_executor(settings.worker.backend, settings.worker.limits).close()
    if local_workers and settings.server.tls_cert:
        raise ConfigError(
            "local workers connect over loopback without TLS: with [server] tls_cert set, use "
            '[execution] backend = "scheduler" and run `expbuild worker daemon` beside it'
        )
    await app.start()
    if local_workers:
        from dataclasses import replace

        from expbuild.worker.agent import WorkerAgent

        target = f"http://127.0.0.1:{app.port}"
        token_file = ""
        if settings.auth.mode == "tokens":
            token_file = _private_token_file(app.local_worker_secret, stack)
        for index in range(local_workers):
            worker_settings = replace(
                settings.worker,
                server_url=target,
                cas_url=target,
                name=f"{settings.worker.name}-local-{index + 1}",
                token_file=token_file,
            )
            agent = WorkerAgent(worker_settings)
            agents.append(agent)
            job = asyncio.create_task(agent.run(), name=f"local-worker-{index + 1}")
            job.add_done_callback(_report_worker_exit)
            agent_tasks.append(job)
        log.info("Started %d local worker(s)", local_workers)
    try:
        await stop.wait()
        log.info("Shutting down")
    finally:
        for agent in agents:
            agent.request_stop()
        if agent_tasks:
            await asyncio.gather(*agent_tasks, return_exceptions=True)
        await app.stop()


def _report_worker_exit(job: asyncio.Task) -> None:
    """A local worker that dies must say so at once, not at shutdown."""
    if not job.cancelled() and job.exception() is not None:
        log.error("Local worker %s stopped: %s", job.get_name(), job.exception())


@click.command("server")
@config_option
@verbose_option
@click.option("--address", metavar="HOST:PORT", help="Listen address (overrides [server] address).")
def server_command(config: str | None, verbose: bool, address: str | None) -> None:
    """Run an ExpBuild server replica: REAPI, the Worker API, health and /metrics.

    Several replicas may share one database and one CAS directory. Without a
    [database] url the embedded PostgreSQL is started.

    \b
    Examples:
      expbuild server --config configs/expbuild-server-remote-workers.toml --verbose
      EXPBUILD_DATABASE__URL=postgresql://expbuild@db/expbuild expbuild server
    """
    setup_logging(verbose)
    settings = settings_or_exit(config, address)
    local = settings.execution.local_workers if settings.execution.backend == "local" else 0
    run_replica(settings, local_workers=local)


def run_replica(settings: Settings, *, local_workers: int) -> None:
    """Database (configured or embedded), server and local workers, until a signal."""
    try:
        check_exposure(settings, warn=False)  # before starting anything (the server warns)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    with contextlib.ExitStack() as stack:
        url = resolve_database_url(settings, stack)
        try:
            aio.run(serve(settings, url, local_workers=local_workers))
        except ConfigError as exc:  # e.g. the worker backend cannot work on this host
            raise click.ClickException(f"configuration error: {exc}") from None
        except DatabaseUnavailable as exc:
            raise click.ClickException(str(exc)) from None


@click.group("db")
def db_group() -> None:
    """Database administration."""


@db_group.command("migrate")
@config_option
@verbose_option
def migrate_command(config: str | None, verbose: bool) -> None:
    """Apply pending schema migrations (the server also does this at start)."""
    setup_logging(verbose)
    settings = settings_or_exit(config)

    async def run(url: str) -> None:
        from expbuild.db.migrate import migrate
        from expbuild.db.pool import create_pool

        pool = await create_pool(url, 1, 1, wait=settings.database.connect_wait.total_seconds())
        conn = await pool.acquire()
        try:
            applied = await migrate(conn)
        finally:
            await pool.release(conn)
            await pool.close()
        if applied:
            for m in applied:
                click.echo(f"applied {m.version:04d}_{m.name}")
        else:
            click.echo("database is up to date")

    with contextlib.ExitStack() as stack:
        try:
            asyncio.run(run(resolve_database_url(settings, stack)))
        except DatabaseUnavailable as exc:
            raise click.ClickException(str(exc)) from None
