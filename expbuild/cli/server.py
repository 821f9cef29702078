"""`expbuild server` (alias `re-server`) and `expbuild db migrate`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
from dataclasses import replace
from pathlib import Path

import click

from expbuild import aio
from expbuild.auth.exposure import check_exposure
from expbuild.cli.common import config_option, settings_or_exit, setup_logging, verbose_option
from expbuild.config import ConfigError, Settings, data_dir
from expbuild.db.pool import DatabaseUnavailable
from expbuild.server.process_group import (
    ChildFailed,
    ChildRole,
    ProcessGroup,
    child_command,
    usable_cores,
)

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


async def serve(
    settings: Settings,
    database_url: str,
    *,
    local_workers: int = 0,
    role: ChildRole | None = None,
) -> None:
    """Run one replica (and optionally in-process workers) until SIGINT/SIGTERM; `role`:
    as a process of `expbuild server --processes N`."""
    with contextlib.ExitStack() as stack:
        await _serve(settings, database_url, local_workers, role, stack)


async def _serve(
    settings: Settings,
    database_url: str,
    local_workers: int,
    role: ChildRole | None,
    stack: contextlib.ExitStack,
) -> None:
    from expbuild.server.app import ServerApp

    app = ServerApp(
        settings,
        database_url,
        process_index=None if role is None else role.index,
        housekeeping=role is None or role.index == 0,
    )
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
    if role is not None:
        role.report_ready()
    if local_workers:
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
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(min=0),
    metavar="N",
    help="Replica processes sharing the port (overrides [server] processes; "
    "0: one per usable core, the default).",
)
@click.option("--child-of", hidden=True)  # internal: a process of a --processes group
def server_command(
    config: str | None,
    verbose: bool,
    address: str | None,
    processes: int | None,
    child_of: str | None,
) -> None:
    """Run an ExpBuild server replica: REAPI, the Worker API, health and /metrics.

    Several replicas may share one database and one CAS directory. Without a
    [database] url the embedded PostgreSQL is started. On a host with several
    cores, N processes (--processes, default: one per core) share the port.

    \b
    Examples:
      expbuild server --config configs/expbuild-server-remote-workers.toml --verbose
      EXPBUILD_DATABASE__URL=postgresql://expbuild@db/expbuild expbuild server
      expbuild server --processes 4
    """
    if child_of is not None:
        run_child(ChildRole.parse(child_of), config, verbose)
        return
    setup_logging(verbose)
    settings = settings_or_exit(config, address)
    if processes is not None:
        settings = replace(settings, server=replace(settings.server, processes=processes))
    try:
        count = process_count(settings)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    if count > 1:
        run_process_group(settings, count, child_command(config, verbose))
        return
    local = settings.execution.local_workers if settings.execution.backend == "local" else 0
    run_replica(settings, local_workers=local)


def process_count(settings: Settings) -> int:
    """How many replica processes `[server] processes` asks for on this host."""
    asked = settings.server.processes
    if settings.execution.backend == "local":
        # Its workers run inside the server process: N processes would be N worker pools.
        if asked > 1:
            raise ConfigError(
                f'[server] processes = {asked} needs [execution] backend = "scheduler": '
                "the local backend's workers run inside its one server process"
            )
        return 1
    return asked or usable_cores()


def run_replica(settings: Settings, *, local_workers: int, role: ChildRole | None = None) -> None:
    """Database (configured or embedded), server and local workers, until a signal."""
    try:
        check_exposure(settings, warn=False)  # before starting anything (the server warns)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    with contextlib.ExitStack() as stack:
        url = resolve_database_url(settings, stack)
        try:
            aio.run(serve(settings, url, local_workers=local_workers, role=role))
        except ConfigError as exc:  # e.g. the worker backend cannot work on this host
            raise click.ClickException(f"configuration error: {exc}") from None
        except DatabaseUnavailable as exc:
            raise click.ClickException(str(exc)) from None


def run_process_group(settings: Settings, count: int, command: list[str]) -> None:
    """The parent of `count` replica processes (expbuild.server.process_group)."""
    try:
        check_exposure(settings, warn=False)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    with contextlib.ExitStack() as stack:
        url = resolve_database_url(settings, stack)  # an embedded one is shared by all
        try:
            code = aio.run(ProcessGroup(settings, url, count, command).run())
        except ConfigError as exc:  # a port in use
            raise click.ClickException(f"configuration error: {exc}") from None
        except (DatabaseUnavailable, ChildFailed) as exc:
            raise click.ClickException(str(exc)) from None
    if code:
        raise SystemExit(code)  # the child has said why


def run_child(role: ChildRole, config: str | None, verbose: bool) -> None:
    """One process of a group: the settings its parent resolved (address, database), its
    number in the logs, and gone when the parent is."""
    role.die_with_parent()
    setup_logging(verbose, tag=f"[{role.index}] ")
    run_replica(settings_or_exit(config), local_workers=0, role=role)


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
