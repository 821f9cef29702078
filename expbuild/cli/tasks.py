"""`expbuild tasks list` and `expbuild tasks show`: what happened to tasks, through the
server's WorkerAdminService (the `admin` scope when auth is on)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click
from google.protobuf import timestamp_pb2

from expbuild.cli.admin import admin_call, platform_dict, platform_text
from expbuild.cli.common import json_option, server_option
from expbuild.config import ConfigError, parse_duration
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import worker_pb2

STATES = ("queued", "leased", "completed", "failed", "cancelled")


def _moment(ts: timestamp_pb2.Timestamp, present: bool) -> str | None:
    return ts.ToDatetime(UTC).isoformat() if present else None


def _task_dict(info: worker_pb2.TaskInfo) -> dict:
    return {
        "task_id": info.task_id,
        "state": info.state,
        "instance_name": info.instance_name,
        "action_digest": info.action_digest,
        "platform": platform_dict(info.platform),
        "priority": info.priority,
        "attempts": info.attempts,
        "max_attempts": info.max_attempts,
        "worker_id": info.worker_id or None,
        "queued_at": _moment(info.queued_at, info.HasField("queued_at")),
        "leased_at": _moment(info.leased_at, info.HasField("leased_at")),
        "completed_at": _moment(info.completed_at, info.HasField("completed_at")),
        "error": info.error or None,
    }


def _event_dict(event: worker_pb2.TaskEvent) -> dict:
    return {
        "at": event.at.ToDatetime(UTC).isoformat(),
        "event": event.event,
        "attempt": event.attempt,
        "worker_id": event.worker_id or None,
        "worker_name": event.worker_name or None,
        "worker_hostname": event.worker_hostname or None,
        "detail": json.loads(event.detail_json or "{}"),
    }


def _seconds(start: str | None, end: str | None) -> str:
    if not start or not end:
        return "-"
    delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return f"{delta.total_seconds():.2f}s"


def _build_of(events: list[dict]) -> str:
    """Which build queued the task, from its RequestMetadata (recorded with `queued`)."""
    for event in events:
        metadata = event["detail"].get("request_metadata") if event["event"] == "queued" else None
        if metadata:
            parts = [
                f"{metadata.get('tool_name', '')} {metadata.get('tool_version', '')}".strip(),
                *(
                    f"{label} {metadata[key]}"
                    for label, key in (
                        ("invocation", "tool_invocation_id"),
                        ("correlated", "correlated_invocations_id"),
                        ("target", "target_id"),
                        ("mnemonic", "action_mnemonic"),
                        ("configuration", "configuration_id"),
                    )
                    if metadata.get(key)
                ),
            ]
            return ", ".join(part for part in parts if part)
    return ""


def _platform_option(values: tuple[str, ...]) -> re_pb2.Platform:
    platform = re_pb2.Platform()
    for value in values:
        name, sep, wanted = value.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{value!r}: expected NAME=VALUE, e.g. OSFamily=linux")
        platform.properties.add(name=name.strip(), value=wanted.strip())
    return platform


def _since_option(value: str | None) -> timestamp_pb2.Timestamp | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    except ValueError:
        try:
            moment = datetime.now(UTC) - parse_duration(value, "--since")
        except ConfigError:
            raise click.BadParameter(
                f"{value!r}: expected a duration (30m, 2h, 1d) or a time (2026-12-04T16:00)",
                param_hint="--since",
            ) from None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


@click.group("tasks")
def tasks_group() -> None:
    """Inspect tasks: recent ones, and one task's whole history."""


@tasks_group.command("list")
@server_option
@json_option
@click.option("--state", type=click.Choice(STATES), help="Only tasks in this state.")
@click.option(
    "--platform",
    "platform",
    multiple=True,
    metavar="NAME=VALUE",
    help="Only tasks that require this platform property (repeatable).",
)
@click.option("--since", metavar="AGE|TIME", help="Queued in the last AGE (30m, 2h) or since TIME.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
def list_command(
    server: str,
    as_json: bool,
    state: str | None,
    platform: tuple[str, ...],
    since: str | None,
    limit: int,
) -> None:
    """List tasks, newest first: state, attempts, worker, wait and run time."""
    request = worker_pb2.ListTasksRequest(
        state=state or "", platform=_platform_option(platform), limit=limit
    )
    since_ts = _since_option(since)
    if since_ts is not None:
        request.since.CopyFrom(since_ts)
    rows = [_task_dict(t) for t in admin_call(server, "ListTasks", request).tasks]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no tasks match")
        return
    click.echo(
        f"{'TASK':<12} {'STATE':<10} {'TRIES':>5}  {'WAITED':>8} {'RAN':>8}  {'WORKER':<20} ACTION"
    )
    for row in rows:
        tries = f"{row['attempts']}/{row['max_attempts']}"
        click.echo(
            f"{row['task_id']:<12} {row['state']:<10} {tries:>5}  "
            f"{_seconds(row['queued_at'], row['leased_at']):>8} "
            f"{_seconds(row['leased_at'], row['completed_at']):>8}  "
            f"{(row['worker_id'] or '-'):<20} {row['action_digest']}"
        )


@tasks_group.command("show")
@server_option
@json_option
@click.argument("task")
def show_command(server: str, as_json: bool, task: str) -> None:
    """Show TASK (task-42, 42 or an operation name) and its whole history:
    when it was queued, where it was leased, why it was retried, how it ended."""
    reply = admin_call(server, "GetTaskHistory", worker_pb2.GetTaskHistoryRequest(task=task))
    summary = _task_dict(reply.task) if reply.HasField("task") else None
    events = [_event_dict(e) for e in reply.events]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "task_id": reply.task_id,
                    "task": summary,
                    "operations": list(reply.operations),
                    "events": events,
                },
                indent=2,
            )
        )
        return
    if summary is None:
        click.echo(f"{reply.task_id} (finished and purged; its history remains)")
    else:
        click.echo(
            f"{reply.task_id} {summary['state']}  attempts {summary['attempts']}/"
            f"{summary['max_attempts']}  action {summary['action_digest']}"
        )
        platform = platform_text(summary["platform"])
        click.echo(
            f"  platform: {platform or '(any)'}  instance: {summary['instance_name'] or '(default)'}"
        )
        click.echo(
            f"  waited {_seconds(summary['queued_at'], summary['leased_at'])}, "
            f"ran {_seconds(summary['leased_at'], summary['completed_at'])}"
        )
        if summary["error"]:
            click.echo(f"  error: {summary['error']}")
    if build := _build_of(events):
        click.echo(f"  build: {build}")
    for operation in reply.operations:
        click.echo(f"  operation {operation}")
    for event in events:
        where = ""
        if event["worker_id"]:
            name = event["worker_name"] or ""
            host = f" on {event['worker_hostname']}" if event["worker_hostname"] else ""
            where = f" {event['worker_id']}" + (f" ({name}{host})" if name else "")
        detail = ", ".join(
            f"{k}={v}" for k, v in sorted(event["detail"].items()) if k != "request_metadata"
        )
        click.echo(
            f"  {event['at']}  {event['event']:<16} attempt {event['attempt']}{where}"
            + (f"  {detail}" if detail else "")
        )
