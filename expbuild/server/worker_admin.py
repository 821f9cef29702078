"""The WorkerAdminService: what operators ask about workers (`expbuild workers ...`)."""

from __future__ import annotations

import logging

import asyncpg
import grpc

from expbuild.db import workers
from expbuild.db.workers import WorkerRecord
from expbuild.errors import InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import worker_pb2, worker_pb2_grpc
from expbuild.server.convert import timestamp
from expbuild.server.status import rpc
from expbuild.text import check_no_nul

log = logging.getLogger(__name__)


def worker_info(record: WorkerRecord) -> worker_pb2.WorkerInfo:
    platform = re_pb2.Platform(
        properties=[
            re_pb2.Platform.Property(name=name, value=value)
            for name in sorted(record.platform)
            for value in record.platform[name]
        ]
    )
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
