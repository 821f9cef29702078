"""`expbuild workers list` and `expbuild workers drain`: the operator's view of the fleet."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from expbuild.cli.admin import admin_call, platform_dict, platform_text
from expbuild.cli.common import json_option, server_option
from expbuild.proto import worker_pb2


def _as_dict(info: worker_pb2.WorkerInfo) -> dict:
    return {
        "worker_id": info.worker_id,
        "name": info.name,
        "hostname": info.hostname,
        "state": info.state,
        "running_tasks": info.running_tasks,
        "max_concurrent_tasks": info.max_concurrent_tasks,
        "platform": platform_dict(info.platform),
        "version": info.version,
        "registered_at": info.registered_at.ToDatetime(UTC).isoformat(),
        "last_heartbeat_at": info.last_heartbeat_at.ToDatetime(UTC).isoformat(),
    }


def _ago(moment: str) -> str:
    seconds = (datetime.now(UTC) - datetime.fromisoformat(moment)).total_seconds()
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


@click.group("workers")
def workers_group() -> None:
    """Inspect and drain the workers registered with a server."""


@workers_group.command("list")
@server_option
@json_option
@click.option("--all", "include_offline", is_flag=True, help="Include offline workers.")
def list_command(server: str, as_json: bool, include_offline: bool) -> None:
    """List workers: state, running/max tasks, platform, last heartbeat."""
    reply = admin_call(
        server, "ListWorkers", worker_pb2.ListWorkersRequest(include_offline=include_offline)
    )
    rows = [_as_dict(w) for w in reply.workers]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no workers registered" + ("" if include_offline else " and online (try --all)"))
        return
    click.echo(f"{'ID':<20} {'NAME':<20} {'STATE':<9} {'TASKS':>7}  {'HEARTBEAT':<10} PLATFORM")
    for row in rows:
        platform = platform_text(row["platform"])
        tasks = f"{row['running_tasks']}/{row['max_concurrent_tasks']}"
        click.echo(
            f"{row['worker_id']:<20} {row['name'][:20]:<20} {row['state']:<9} {tasks:>7}  "
            f"{_ago(row['last_heartbeat_at']):<10} {platform}"
        )


@workers_group.command("drain")
@server_option
@json_option
@click.argument("worker")
def drain_command(server: str, as_json: bool, worker: str) -> None:
    """Take WORKER (id or unique name) out of service gracefully.

    It stops taking tasks at its next heartbeat, finishes what it runs (handing back
    whatever outlasts its grace period, to run elsewhere at once), deregisters and exits.
    """
    reply = admin_call(server, "DrainWorker", worker_pb2.DrainWorkerRequest(worker_id=worker))
    if as_json:
        click.echo(json.dumps(_as_dict(reply.worker), indent=2))
    else:
        click.echo(
            f"worker {reply.worker.worker_id} ({reply.worker.name}) is draining; "
            f"{reply.worker.running_tasks} task(s) still running"
        )
