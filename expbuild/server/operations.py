"""Operations: how a task's state is presented to clients, and the google.longrunning service.

`OperationTracker.follow` is the stream behind both Execute and WaitExecution: it reads the
operation from Postgres, yields it whenever its stage changes, and sleeps on the replica's
LISTEN wake-ups (or the polling fallback) in between. Nothing about an operation lives in
one replica's memory, so any replica can stream any operation.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, empty_pb2
from google.rpc import code_pb2, status_pb2

from expbuild.auth.principal import current_principal
from expbuild.db import operations as db_operations
from expbuild.db.notifications import Notifications
from expbuild.db.operations import OperationRecord
from expbuild.errors import InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.server.status import rpc

Stage = re_pb2.ExecutionStage
log = logging.getLogger(__name__)

_TASK_STAGES = {
    "queued": Stage.QUEUED,
    "leased": Stage.EXECUTING,
    "completed": Stage.COMPLETED,
    "failed": Stage.COMPLETED,
    "cancelled": Stage.COMPLETED,
}


def stage_of(record: OperationRecord) -> int:
    if record.cached_result is not None or record.cancelled_at is not None:
        return Stage.COMPLETED
    return _TASK_STAGES.get(record.task_state or "", Stage.UNKNOWN)


def execute_response(record: OperationRecord) -> re_pb2.ExecuteResponse:
    """The final ExecuteResponse of a done operation."""
    if record.cached_result is not None:
        return re_pb2.ExecuteResponse.FromString(record.cached_result)
    if record.cancelled_at is not None or record.task_state == "cancelled":
        status = status_pb2.Status(code=code_pb2.CANCELLED, message="the operation was cancelled")
        return re_pb2.ExecuteResponse(status=status, message=status.message)
    if record.result is not None:
        return re_pb2.ExecuteResponse.FromString(record.result)
    status = status_pb2.Status(
        code=record.error_code or code_pb2.INTERNAL,
        message=record.error or "the task failed without a result",
    )
    return re_pb2.ExecuteResponse(status=status, message=status.message)


def to_operation(record: OperationRecord) -> operations_pb2.Operation:
    metadata = re_pb2.ExecuteOperationMetadata(
        stage=stage_of(record), action_digest=record.action_digest.to_proto()
    )
    if metadata.stage == Stage.EXECUTING and record.worker_id:
        # Lets clients show where their action runs while it runs.
        metadata.partial_execution_metadata.worker = record.worker_name or record.worker_id
        if record.queued_at is not None:
            metadata.partial_execution_metadata.queued_timestamp.FromDatetime(record.queued_at)
        if record.leased_at is not None:
            metadata.partial_execution_metadata.worker_start_timestamp.FromDatetime(
                record.leased_at
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

    async def follow(
        self,
        name: str,
        *,
        seen_stage: int | None = None,
        max_wait: float = 24 * 3600,
        owner: str | None = None,
    ) -> AsyncIterator[operations_pb2.Operation]:
        """Yield the operation at every stage change (from `seen_stage` on) until it is done;
        `owner`: only if that principal created it (else NotFound)."""
        deadline = time.monotonic() + max_wait
        last_stage = seen_stage
        while True:
            record = await db_operations.get_operation(self.pool, name, owner)
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


_LIST_STAGES = {"queued", "executing", "completed"}
_MAX_PAGE = 1000


def _list_filter(text: str) -> str | None:
    """Accept "", "state=queued", "stage = EXECUTING", "done=true" (= completed)."""
    text = text.strip()
    if not text:
        return None
    key, sep, value = (part.strip().lower() for part in text.partition("="))
    if sep and key in ("state", "stage") and value in _LIST_STAGES:
        return value
    if sep and key == "done" and value == "true":
        return "completed"
    raise InvalidArgument(
        f"unsupported filter {text!r}; use state=queued, state=executing or state=completed"
    )


def _page_token(record: OperationRecord) -> str:
    raw = f"{record.created_at.isoformat()}|{record.name}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def _after(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        created, name = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created), name
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"page_token {token!r} was not issued by this server") from None


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    def __init__(self, tracker: OperationTracker):
        self.tracker = tracker

    @rpc
    async def GetOperation(self, request, context):
        record = await db_operations.get_operation(
            self.tracker.pool, request.name, current_principal().owner_filter()
        )
        return to_operation(record)

    @rpc
    async def ListOperations(self, request, context):
        limit = min(request.page_size or 100, _MAX_PAGE)
        records = await db_operations.list_operations(
            self.tracker.pool,
            stage=_list_filter(request.filter),
            limit=limit,
            after=_after(request.page_token),
            owner=current_principal().owner_filter(),
        )
        reply = operations_pb2.ListOperationsResponse(operations=[to_operation(r) for r in records])
        if len(records) == limit:
            reply.next_page_token = _page_token(records[-1])
        return reply

    @rpc
    async def CancelOperation(self, request, context):
        task_cancelled = await db_operations.cancel_operation(
            self.tracker.pool, request.name, current_principal().owner_filter()
        )
        log.info(
            "Operation %s cancelled%s", request.name, " with its task" if task_cancelled else ""
        )
        return empty_pb2.Empty()

    @rpc
    async def DeleteOperation(self, request, context):
        await db_operations.delete_operation(
            self.tracker.pool, request.name, current_principal().owner_filter()
        )
        return empty_pb2.Empty()
