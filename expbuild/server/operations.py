"""Operations: how a task's state is presented to clients, and the google.longrunning service.

`OperationTracker.follow` is the stream behind both Execute and WaitExecution: it reads the
operation from Postgres, yields it whenever its stage changes, and sleeps on the replica's
LISTEN wake-ups (or the polling fallback) in between. Nothing about an operation lives in
one replica's memory, so any replica can stream any operation.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, empty_pb2
from google.rpc import code_pb2, status_pb2

from expbuild.db import operations as db_operations
from expbuild.db.notifications import Notifications
from expbuild.db.operations import OperationRecord
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.server.status import rpc

Stage = re_pb2.ExecutionStage

_TASK_STAGES = {
    "queued": Stage.QUEUED,
    "leased": Stage.EXECUTING,
    "completed": Stage.COMPLETED,
    "failed": Stage.COMPLETED,
    "cancelled": Stage.COMPLETED,
}


def stage_of(record: OperationRecord) -> int:
    if record.cached_result is not None:
        return Stage.COMPLETED
    return _TASK_STAGES.get(record.task_state or "", Stage.UNKNOWN)


def execute_response(record: OperationRecord) -> re_pb2.ExecuteResponse:
    """The final ExecuteResponse of a done operation."""
    if record.cached_result is not None:
        return re_pb2.ExecuteResponse.FromString(record.cached_result)
    if record.result is not None:
        return re_pb2.ExecuteResponse.FromString(record.result)
    if record.task_state == "cancelled":
        status = status_pb2.Status(code=code_pb2.CANCELLED, message="the operation was cancelled")
    else:
        status = status_pb2.Status(
            code=record.error_code or code_pb2.INTERNAL,
            message=record.error or "the task failed without a result",
        )
    return re_pb2.ExecuteResponse(status=status, message=status.message)


def to_operation(record: OperationRecord) -> operations_pb2.Operation:
    metadata = re_pb2.ExecuteOperationMetadata(
        stage=stage_of(record), action_digest=record.action_digest.to_proto()
    )
    operation = operations_pb2.Operation(name=record.name, done=record.done)
    operation.metadata.Pack(metadata)
    if record.done:
        response = any_pb2.Any()
        response.Pack(execute_response(record))
        operation.response.CopyFrom(response)
    return operation


class OperationTracker:
    def __init__(self, pool: asyncpg.Pool, notifications: Notifications):
        self.pool = pool
        self.notifications = notifications

    async def follow(self, name: str, *, max_wait: float = 24 * 3600) -> AsyncIterator[operations_pb2.Operation]:
        """Yield the operation now and at every stage change until it is done."""
        deadline = time.monotonic() + max_wait
        last_stage = None
        while True:
            record = await db_operations.get_operation(self.pool, name)
            stage = stage_of(record)
            if stage != last_stage or record.done:
                yield to_operation(record)
                last_stage = stage
            if record.done or record.task_id is None:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await self.notifications.wait_for_task_done(record.task_id, remaining)


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    def __init__(self, tracker: OperationTracker):
        self.tracker = tracker

    @rpc
    async def GetOperation(self, request, context):
        record = await db_operations.get_operation(self.tracker.pool, request.name)
        return to_operation(record)

    @rpc
    async def DeleteOperation(self, request, context):
        await db_operations.get_operation(self.tracker.pool, request.name)
        return empty_pb2.Empty()
