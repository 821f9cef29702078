"""The `expbuild` command group."""

from __future__ import annotations

import click

from expbuild import __version__
from expbuild.cli.client_commands import execute, run
from expbuild.cli.server import db_group, server_command
from expbuild.cli.tasks import tasks_group
from expbuild.cli.tokens import tokens_group
from expbuild.cli.up import up_command
from expbuild.cli.worker import worker_group
from expbuild.cli.workers import workers_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="expbuild")
def main() -> None:
    """ExpBuild: remote execution for Bazel and other REAPI v2 clients.

    \b
    On one machine:      expbuild up
    A server replica:    expbuild server --config configs/expbuild-server.toml
    A worker on a host:  expbuild worker daemon --config configs/expbuild-worker.toml
    Run a command:       expbuild run -- sh -c 'echo hello'
    See the workers:     expbuild workers list
    """


main.add_command(server_command)
main.add_command(worker_group)
main.add_command(workers_group)
main.add_command(tasks_group)
main.add_command(db_group)
main.add_command(tokens_group)
main.add_command(up_command)
main.add_command(run)
main.add_command(execute)
