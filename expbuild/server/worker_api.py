"""The Worker API (expbuild.worker.v1) over `expbuild.scheduling`: how worker daemons
register, poll, heartbeat and report.

Workers talk only to this service (and to the CAS). Every call is one or two short
statements; a PollTasks call that finds no work waits on the replica's LISTEN wake-ups.
"""

from __future__ import annotations

import asyncpg
import grpc

from expbuild.auth.principal import current_principal
from expbuild.cas.store import FileStore
from expbuild.config import ServerSettings
from expbuild.db.notifications import Notifications
from expbuild.proto import worker_pb2, worker_pb2_grpc
from expbuild.reapi.platforms import platform_spec
from expbuild.scheduling import results, workers
from expbuild.scheduling.actions import checked_duration
from expbuild.scheduling.completions import CompletionBatcher
from expbuild.scheduling.leases import Assignment, LeaseDispatcher
from expbuild.scheduling.sessions import WorkerSessions
from expbuild.scheduling.task_names import parse_task_name, task_name
from expbuild.server import metrics
from expbuild.server.convert import duration, timestamp
from expbuild.server.metrics import LEASE_ATTEMPTS, TASK_COMPLETIONS
from expbuild.server.status import rpc


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: FileStore,
        notifications: Notifications,
        settings: ServerSettings,
        sessions: WorkerSessions,
    ):
        self.pool = pool
        self.store = store
        self.settings = settings
        self.leases = LeaseDispatcher(pool, store, notifications, settings)
        # This replica's concurrent CompleteTask calls share statements.
        self.completions = CompletionBatcher(pool)
        self.sessions = sessions

    @rpc
    async def RegisterWorker(
        self, request: worker_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ):
        worker_id = await workers.register(
            self.pool,
            current_principal(),
            worker_id=request.worker_id,
            name=request.name,
            hostname=request.hostname,
            platform=platform_spec(request.platform, "worker platform"),
            max_concurrent=request.max_concurrent_tasks,
            version=request.version,
        )
        self.leases.forget_worker(worker_id)  # its platform may have changed
        return worker_pb2.RegisterWorkerResponse(
            worker_id=worker_id,
            heartbeat_interval=duration(self.settings.heartbeat_interval),
            lease_duration=duration(self.settings.lease_duration),
            poll_timeout=duration(self.settings.poll_timeout),
            max_inline_blob_bytes=results.MAX_INLINE_BLOB_BYTES,
        )

    @rpc
    async def Heartbeat(
        self, request: worker_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ):
        workers.require_worker_id(request.worker_id)
        running = [(parse_task_name(lease.task_id), lease.lease_token) for lease in request.running]
        outcome = await workers.heartbeat(
            self.pool, current_principal(), request.worker_id, running, self.settings.lease_duration
        )
        if not outcome.known:
            return worker_pb2.HeartbeatResponse(reregister=True)
        return worker_pb2.HeartbeatResponse(
            cancelled_task_ids=[task_name(t) for t in outcome.cancelled],
            lost_task_ids=[task_name(t) for t in outcome.lost],
            drain=outcome.worker_state == "draining",
        )

    @rpc
    async def PollTasks(
        self, request: worker_pb2.PollTasksRequest, context: grpc.aio.ServicerContext
    ):
        worker_id = workers.require_worker_id(request.worker_id)
        timeout = (
            checked_duration(request.timeout, "timeout") if request.HasField("timeout") else None
        )
        polled = await self.leases.poll(current_principal(), worker_id, request.max_tasks, timeout)
        LEASE_ATTEMPTS.labels("empty").inc(polled.empty_leases)
        if polled.leased:
            LEASE_ATTEMPTS.labels("leased").inc()
        return worker_pb2.PollTasksResponse(tasks=[_task_message(a) for a in polled.assignments])

    @rpc
    async def CompleteTask(
        self, request: worker_pb2.CompleteTaskRequest, context: grpc.aio.ServicerContext
    ):
        accepted = await results.accept_result(
            self.pool,
            self.store,
            self.completions,
            current_principal(),
            workers.require_worker_id(request.worker_id),
            parse_task_name(request.task_id),
            request.lease_token,
            request.response,
            request.inline_blobs,
        )
        TASK_COMPLETIONS.labels("succeeded" if accepted.succeeded else "failed").inc()
        done = accepted.task
        metrics.observe_finished_task(
            done.platform_json, done.instance_name, done.waited_seconds, done.ran_seconds
        )
        return worker_pb2.CompleteTaskResponse()

    @rpc
    async def ReleaseTask(
        self, request: worker_pb2.ReleaseTaskRequest, context: grpc.aio.ServicerContext
    ):
        await results.release_lease(
            self.pool,
            current_principal(),
            workers.require_worker_id(request.worker_id),
            parse_task_name(request.task_id),
            request.lease_token,
            request.reason,
        )
        metrics.TASK_REQUEUES.labels("released").inc()
        return worker_pb2.ReleaseTaskResponse()

    @rpc
    async def OpenSession(
        self, request: worker_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext
    ):
        worker_id = await workers.acting_worker(self.pool, current_principal(), request.worker_id)
        async for _ in self.sessions.hold(worker_id):
            yield worker_pb2.SessionEvent(opened=True)

    @rpc
    async def DeregisterWorker(
        self, request: worker_pb2.DeregisterWorkerRequest, context: grpc.aio.ServicerContext
    ):
        await workers.deregister(self.pool, current_principal(), request.worker_id)
        self.leases.forget_worker(request.worker_id)
        return worker_pb2.DeregisterWorkerResponse()


def _task_message(assignment: Assignment) -> worker_pb2.Task:
    task = assignment.task
    message = worker_pb2.Task(
        task_id=task_name(task.task_id),
        lease_token=task.lease_token,
        instance_name=task.instance_name,
        action_digest=task.action_digest.to_proto(),
        action=assignment.action,
        command=assignment.command,
        attempt=task.attempt,
        queued_at=timestamp(task.queued_at),
        do_not_cache=task.do_not_cache,
    )
    if task.timeout is not None:
        message.timeout.CopyFrom(duration(task.timeout))
    return message
