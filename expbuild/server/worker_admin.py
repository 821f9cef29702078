"""The WorkerAdminService: what operators ask about workers and tasks
(`expbuild workers ...`, `expbuild tasks ...`)."""

from __future__ import annotations

import json
import logging
from datetime import UTC

import asyncpg
import grpc

from expbuild.db import tasks, workers
from expbuild.db.workers import WorkerRecord
from expbuild.errors import InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import worker_pb2, worker_pb2_grpc
from expbuild.reapi.platforms import platform_spec
from expbuild.server.convert import timestamp
from expbuild.server.status import rpc
from expbuild.text import check_no_nul

log = logging.getLogger(__name__)


DEFAULT_TASK_LIMIT = 50


def platform_message(platform: dict[str, list[str]]) -> re_pb2.Platform:
    return re_pb2.Platform(
        properties=[
            re_pb2.Platform.Property(name=name, value=value)
            for name in sorted(platform)
            for value in platform[name]
        ]
    )


def worker_info(record: WorkerRecord) -> worker_pb2.WorkerInfo:
    platform = platform_message(record.platform)
    return worker_pb2.WorkerInfo(
        worker_id=record.worker_id,
        name=record.name,
        hostname=record.hostname,
        platform=platform,
        max_concurrent_tasks=record.max_concurrent,
        state=record.state,
        version=record.version,
        registered_at=timestamp(record.registered_at),
        last_heartbeat_at=timestamp(record.last_heartbeat_at),
        running_tasks=record.running,
    )


def task_info(task: tasks.TaskSummary) -> worker_pb2.TaskInfo:
    info = worker_pb2.TaskInfo(
        task_id=f"task-{task.task_id}",
        instance_name=task.instance_name,
        action_digest=task.action_digest,
        state=task.state,
        platform=platform_message(task.platform),
        priority=task.priority,
        attempts=task.attempts,
        max_attempts=task.max_attempts,
        worker_id=task.worker_id or "",
        queued_at=timestamp(task.queued_at),
        error=task.error or "",
    )
    if task.leased_at is not None:
        info.leased_at.FromDatetime(task.leased_at)
    if task.completed_at is not None:
        info.completed_at.FromDatetime(task.completed_at)
    return info


def task_event(event: tasks.TaskEvent) -> worker_pb2.TaskEvent:
    return worker_pb2.TaskEvent(
        at=timestamp(event.at),
        event=event.event,
        worker_id=event.worker_id or "",
        worker_name=event.worker_name or "",
        worker_hostname=event.worker_hostname or "",
        attempt=event.attempt or 0,
        detail_json=json.dumps(event.detail, sort_keys=True),
    )


def _since(request: worker_pb2.ListTasksRequest):
    if not request.HasField("since"):
        return None
    try:
        return request.since.ToDatetime(UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument("since is not a valid Timestamp") from None


class WorkerAdminServicer(worker_pb2_grpc.WorkerAdminServiceServicer):
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    @rpc
    async def ListWorkers(
        self, request: worker_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ):
        records = await workers.list_workers(self.pool, request.include_offline)
        return worker_pb2.ListWorkersResponse(workers=[worker_info(r) for r in records])

    @rpc
    async def DrainWorker(
        self, request: worker_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext
    ):
        if not request.worker_id:
            raise InvalidArgument("worker_id is empty; give a worker id or name")
        record = await workers.drain_worker(self.pool, check_no_nul(request.worker_id, "worker_id"))
        log.info("Worker %s (%s) is draining", record.worker_id, record.name)
        return worker_pb2.DrainWorkerResponse(worker=worker_info(record))

    @rpc
    async def ListTasks(self, request: worker_pb2.ListTasksRequest, context):
        found = await tasks.list_tasks(
            self.pool,
            state=check_no_nul(request.state, "state") or None,
            platform=platform_spec(request.platform, "platform") or None,
            since=_since(request),
            limit=request.limit or DEFAULT_TASK_LIMIT,
        )
        return worker_pb2.ListTasksResponse(tasks=[task_info(t) for t in found])

    @rpc
    async def GetTaskHistory(self, request: worker_pb2.GetTaskHistoryRequest, context):
        task_id = await tasks.resolve_task(self.pool, check_no_nul(request.task, "task"))
        history = await tasks.task_history(self.pool, task_id)
        reply = worker_pb2.GetTaskHistoryResponse(
            task_id=f"task-{task_id}",
            events=[task_event(e) for e in history.events],
            operations=history.operations,
        )
        if history.summary is not None:
            reply.task.CopyFrom(task_info(history.summary))
        return reply
