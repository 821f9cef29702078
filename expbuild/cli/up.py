"""`expbuild up`: everything on one machine, in one supervised process tree."""

from __future__ import annotations

import logging

import click

from expbuild.cli.common import config_option, settings_or_exit, setup_logging, verbose_option
from expbuild.cli.server import run_replica

log = logging.getLogger("expbuild.up")


@click.command("up")
@config_option
@verbose_option
@click.option(
    "--workers",
    "-w",
    "worker_count",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Local workers to run beside the server.",
)
@click.option("--address", metavar="HOST:PORT", help="Listen address (default 127.0.0.1:8980).")
def up_command(config: str | None, verbose: bool, worker_count: int, address: str | None) -> None:
    """Start PostgreSQL (embedded unless [database] url is set), the server and local workers.

    Ctrl+C stops all of it cleanly. Then, in another terminal:

    \b
      expbuild run -- sh -c 'echo hello from remote'
      bazel build --remote_executor=grpc://127.0.0.1:8980 //...
    """
    setup_logging(verbose)
    settings = settings_or_exit(config, address)
    run_replica(settings, local_workers=worker_count)
    log.info("Stopped")
