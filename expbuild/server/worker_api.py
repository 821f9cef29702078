"""The Worker API (expbuild.worker.v1): how worker daemons register, poll, heartbeat and report.

Workers talk only to this service (and to the CAS). Every call is one or two short
statements; a PollTasks call that finds no work waits on the replica's LISTEN wake-ups.
"""

from __future__ import annotations

import logging
import time

import asyncpg

from expbuild.cas.store import FileStore
from expbuild.config import ServerSettings
from expbuild.db import queue, workers
from expbuild.db.notifications import Notifications
from expbuild.digest import Digest
from expbuild.errors import InvalidArgument, NotFound
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import worker_pb2, worker_pb2_grpc
from expbuild.server import metrics
from expbuild.server.convert import duration, platform_spec, timestamp
from expbuild.server.status import rpc

log = logging.getLogger(__name__)


def _task_id(text: str) -> int:
    raw = text.removeprefix("task-")
    if not raw.isdigit():
        raise InvalidArgument(f"task id {text!r} is not a task id such as 'task-42'")
    return int(raw)


def task_name(task_id: int) -> str:
    return f"task-{task_id}"


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: FileStore,
        notifications: Notifications,
        settings: ServerSettings,
    ):
        self.pool = pool
        self.store = store
        self.notifications = notifications
        self.settings = settings

    def _require_worker(self, worker_id: str) -> str:
        if not worker_id:
            raise InvalidArgument("worker_id is empty; call RegisterWorker first")
        return worker_id

    @rpc
    async def RegisterWorker(self, request: worker_pb2.RegisterWorkerRequest, context):
        platform = platform_spec(request.platform, "worker platform")
        worker_id = await workers.register_worker(
            self.pool,
            worker_id=request.worker_id,
            name=request.name or request.hostname or "worker",
            hostname=request.hostname,
            platform=platform,
            max_concurrent=request.max_concurrent_tasks or 1,
            version=request.version,
        )
        log.info(
            "Worker %s registered with platform: %s",
            worker_id,
            {k: v[0] if len(v) == 1 else v for k, v in platform.items()},
        )
        return worker_pb2.RegisterWorkerResponse(
            worker_id=worker_id,
            heartbeat_interval=duration(self.settings.heartbeat_interval),
            lease_duration=duration(self.settings.lease_duration),
            poll_timeout=duration(self.settings.poll_timeout),
        )

    @rpc
    async def Heartbeat(self, request: worker_pb2.HeartbeatRequest, context):
        worker_id = self._require_worker(request.worker_id)
        running = [(_task_id(lease.task_id), lease.lease_token) for lease in request.running]
        outcome = await workers.heartbeat(
            self.pool, worker_id, running, self.settings.lease_duration
        )
        if not outcome.known:
            return worker_pb2.HeartbeatResponse(reregister=True)
        return worker_pb2.HeartbeatResponse(
            cancelled_task_ids=[task_name(t) for t in outcome.cancelled],
            lost_task_ids=[task_name(t) for t in outcome.lost],
            drain=outcome.worker_state == "draining",
        )

    @rpc
    async def PollTasks(self, request: worker_pb2.PollTasksRequest, context):
        worker_id = self._require_worker(request.worker_id)
        try:
            worker = await workers.get_worker(self.pool, worker_id)
        except NotFound:
            raise NotFound(f"worker {worker_id} is not registered; register again") from None
        limit = min(request.max_tasks or 1, worker.max_concurrent)
        wait = self.settings.poll_timeout.total_seconds()
        if request.HasField("timeout"):
            wait = min(wait, max(request.timeout.ToTimedelta().total_seconds(), 0.0))
        deadline = time.monotonic() + wait
        hops: int | None = None  # set when a NOTIFY woke this poll
        while True:
            leased = await queue.lease_tasks(
                self.pool, worker_id, worker.platform, limit, self.settings.lease_duration
            )
            metrics.LEASE_ATTEMPTS.labels("leased" if leased else "empty").inc()
            if hops is not None and not leased:
                # Woken for a task this worker cannot run (platform): let the next
                # idle poller try. (Each queued task sends its own NOTIFY, so a full
                # lease needs no passing on.)
                self.notifications.pass_work_on(hops)
            if leased:
                tasks = [await self._task_message(t, worker_id) for t in leased]
                return worker_pb2.PollTasksResponse(tasks=[t for t in tasks if t is not None])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return worker_pb2.PollTasksResponse()
            hops = await self.notifications.wait_for_work(remaining)

    async def _task_message(self, task: queue.LeasedTask, worker_id: str) -> worker_pb2.Task | None:
        """Inline Action and Command so the worker needs no extra round trips to start."""
        try:
            action = re_pb2.Action.FromString(await self.store.get(task.action_digest))
            command_digest = Digest.from_proto(action.command_digest)
            command = re_pb2.Command.FromString(await self.store.get(command_digest))
        except NotFound as exc:
            # The blobs vanished after Execute checked them: fail this task, not the poll.
            response = re_pb2.ExecuteResponse(message=str(exc))
            response.status.code = 9  # FAILED_PRECONDITION
            response.status.message = f"{exc}; upload the action's blobs again"
            await queue.complete_task(
                self.pool,
                task.task_id,
                task.lease_token,
                worker_id,
                succeeded=False,
                response=response.SerializeToString(),
                cache_result=None,
                detail={"error": str(exc)},
            )
            return None
        log.info("Leased task %s to worker %s", task_name(task.task_id), worker_id)
        message = worker_pb2.Task(
            task_id=task_name(task.task_id),
            lease_token=task.lease_token,
            instance_name=task.instance_name,
            action_digest=task.action_digest.to_proto(),
            action=action,
            command=command,
            attempt=task.attempt,
            queued_at=timestamp(task.queued_at),
            do_not_cache=task.do_not_cache,
        )
        if task.timeout is not None:
            message.timeout.CopyFrom(duration(task.timeout))
        return message

    @rpc
    async def CompleteTask(self, request: worker_pb2.CompleteTaskRequest, context):
        worker_id = self._require_worker(request.worker_id)
        task_id = _task_id(request.task_id)
        response = request.response
        succeeded = response.status.code == 0 and response.HasField("result")
        cacheable = succeeded and response.result.exit_code == 0
        done = await queue.complete_task(
            self.pool,
            task_id,
            request.lease_token,
            worker_id,
            succeeded=succeeded,
            response=response.SerializeToString(),
            cache_result=response.result.SerializeToString() if cacheable else None,
            detail={"exit_code": response.result.exit_code, "status": response.status.code},
        )
        metrics.TASK_COMPLETIONS.labels("succeeded" if succeeded else "failed").inc()
        metrics.observe_finished_task(
            done.platform, done.instance_name, done.queued_at, done.leased_at, done.completed_at
        )
        log.info(
            "Task %s completed on worker %s (exit code %d)",
            request.task_id,
            worker_id,
            response.result.exit_code,
        )
        return worker_pb2.CompleteTaskResponse()

    @rpc
    async def ReleaseTask(self, request: worker_pb2.ReleaseTaskRequest, context):
        worker_id = self._require_worker(request.worker_id)
        await queue.release_task(
            self.pool,
            _task_id(request.task_id),
            request.lease_token,
            worker_id,
            request.reason or "released by worker",
        )
        metrics.TASK_REQUEUES.labels("released").inc()
        log.info(
            "Task %s handed back by worker %s: %s",
            request.task_id,
            worker_id,
            request.reason or "no reason given",
        )
        return worker_pb2.ReleaseTaskResponse()

    @rpc
    async def DeregisterWorker(self, request: worker_pb2.DeregisterWorkerRequest, context):
        worker_id = self._require_worker(request.worker_id)
        requeued = await workers.deregister_worker(self.pool, worker_id)
        log.info("Worker %s deregistered (%d task(s) requeued)", worker_id, requeued)
        return worker_pb2.DeregisterWorkerResponse()
