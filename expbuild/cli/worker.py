"""`expbuild worker daemon` (alias `expbuild-worker daemon`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import click

from expbuild import aio
from expbuild.cli.common import config_option, settings_or_exit, setup_logging, verbose_option

log = logging.getLogger("expbuild.worker")


@click.group("worker")
def worker_group() -> None:
    """Worker daemons that run actions for a server."""


@worker_group.command("daemon")
@config_option
@verbose_option
@click.option("--server", "server_url", metavar="URL", help="Override [worker] server_url.")
@click.option(
    "--max-concurrent-tasks",
    type=click.IntRange(min=1),
    help="Override [worker] max_concurrent_tasks.",
)
def daemon_command(
    config: str | None, verbose: bool, server_url: str | None, max_concurrent_tasks: int | None
) -> None:
    """Register with the server, poll for tasks and run them until stopped.

    Ctrl+C or SIGTERM stops polling, lets running actions finish (up to a grace
    period), hands back what is still running and deregisters; a second signal
    exits at once.

    \b
    Example:
      expbuild worker daemon --config configs/expbuild-worker.toml --verbose
    """
    from dataclasses import replace

    from expbuild.client.channel import ChannelSecurityError
    from expbuild.config import ConfigError, grpc_targets

    setup_logging(verbose)
    settings = settings_or_exit(config)
    worker = settings.worker
    if server_url:
        try:
            grpc_targets(server_url, "--server")
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
        worker = replace(worker, server_url=server_url, cas_url="")
    if max_concurrent_tasks:
        worker = replace(worker, max_concurrent_tasks=max_concurrent_tasks)
    try:
        aio.run(_run_agent(worker))
    except (ConfigError, ChannelSecurityError) as exc:  # e.g. the backend cannot work here
        raise click.ClickException(f"configuration error: {exc}") from None


async def _run_agent(settings) -> None:
    from expbuild.worker import metrics
    from expbuild.worker.agent import WorkerAgent

    agent = WorkerAgent(settings)
    if settings.metrics_address:
        port = metrics.start_http_server(settings.metrics_address)
        log.info(
            "Worker metrics at http://%s/metrics",
            settings.metrics_address.rsplit(":", 1)[0] + f":{port}",
        )
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info(
                "Received %s: finishing running actions, then exiting "
                "(send it again to exit at once)",
                signal.Signals(signum).name,
            )
            agent.request_stop()
        else:
            log.warning("Second signal: exiting now")
            os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await agent.run()
