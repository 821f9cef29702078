"""The console scripts users of the original ExpBuild know, as aliases of `expbuild ...`."""

from __future__ import annotations

from expbuild.cli.client_commands import execute, run
from expbuild.cli.server import server_command
from expbuild.cli.worker import worker_group


def re_server() -> None:
    """`re-server [--config FILE] [--verbose]` is `expbuild server`."""
    server_command(prog_name="re-server")


def expbuild_worker() -> None:
    """`expbuild-worker daemon ...` is `expbuild worker daemon ...`."""
    worker_group(prog_name="expbuild-worker")


def expbuild_cli() -> None:
    """`expbuild-cli run ...` / `expbuild-cli execute ...` are `expbuild run` / `expbuild execute`."""
    import click

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    def cli() -> None:
        """ExpBuild client: run commands remotely and execute uploaded actions."""

    cli.add_command(run)
    cli.add_command(execute)
    cli(prog_name="expbuild-cli")
