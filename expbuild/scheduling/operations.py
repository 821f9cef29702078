"""Operations: a client's handle on one execution, its stage and its final response.

`OperationTracker.follow` is the stream behind Execute and WaitExecution: it yields the
operation whenever its stage changes, and sleeps on the replica's LISTEN wake-ups in
between (polling only while the listener is disconnected). It reads the operation from
Postgres only when a notification does not say enough: a lease's notification carries
what the EXECUTING stage shows, so a task Execute has just queued is read once, when it
is done. Nothing about an operation lives in one replica's memory, so any replica can
stream any operation.

A database outage does not end a stream at once: it keeps trying to read the operation,
with backoff, for `outage_patience` seconds, then ends with UNAVAILABLE so that the
client re-attaches (WaitExecution) — to this replica or another.

An operation belongs to the principal that submitted it (`expbuild.auth`): only it, or an
admin, may get, follow, list, cancel or delete it. Another principal's operation is
"not found", so that its existence does not leak. With auth off every caller is the one
anonymous admin and sees everything.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime

import asyncpg
from google.rpc import code_pb2, status_pb2

from expbuild.auth.principal import Principal
from expbuild.db import operations as db_operations
from expbuild.db.notifications import Mark, Notifications
from expbuild.db.operations import OperationRecord
from expbuild.db.outages import is_database_outage, outage_error
from expbuild.digest import Digest
from expbuild.errors import InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.text import check_no_nul, quoted

Stage = re_pb2.ExecutionStage
log = logging.getLogger(__name__)

_TASK_STAGES = {
    "queued": Stage.QUEUED,
    "leased": Stage.EXECUTING,
    "completed": Stage.COMPLETED,
    "failed": Stage.COMPLETED,
    "cancelled": Stage.COMPLETED,
}
_LIST_STAGES = {"queued", "executing", "completed"}
MAX_LIST_PAGE = 1000


def stage_of(record: OperationRecord) -> re_pb2.ExecutionStage.Value:
    if record.cached_result is not None or record.cancelled_at is not None:
        return Stage.COMPLETED
    return _TASK_STAGES.get(record.task_state or "", Stage.UNKNOWN)


def final_response(record: OperationRecord) -> re_pb2.ExecuteResponse:
    """The ExecuteResponse of a done operation."""
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


def final_response_bytes(record: OperationRecord) -> bytes:
    """`final_response` serialized: the stored bytes as they are when there are some, so
    sending a finished operation does not parse and re-serialize its response."""
    cancelled = record.cancelled_at is not None or record.task_state == "cancelled"
    if record.cached_result is not None:
        return record.cached_result
    if record.result is not None and not cancelled:
        return record.result
    return final_response(record).SerializeToString()


def queued_operation(
    name: str, instance_name: str, digest: Digest, task_id: int, principal: Principal
) -> OperationRecord:
    """The operation of a task just queued, as a read would return it then."""
    return OperationRecord(
        name=name,
        instance_name=instance_name,
        action_digest=digest,
        task_id=task_id,
        cached_result=None,
        task_state="queued",
        result=None,
        error_code=None,
        error=None,
        worker_id=None,
        queued_at=None,
        leased_at=None,
        completed_at=None,
        principal=principal.name,
    )


def operation_name(name: str) -> str:
    """A client-given operation name, fit to look up (names this server gives are UUIDs)."""
    if not name:
        raise InvalidArgument("the operation name is empty")
    return check_no_nul(name, "operation name")


def owner_filter(principal: Principal) -> str | None:
    """Whose operations `principal` may see and act on: its own; an admin's, everyone's
    (None)."""
    return None if principal.is_admin else principal.name


class OperationTracker:
    def __init__(
        self, pool: asyncpg.Pool, notifications: Notifications, outage_patience: float = 30.0
    ):
        self.pool = pool
        self.notifications = notifications
        self.outage_patience = outage_patience

    async def get(self, principal: Principal, name: str) -> OperationRecord:
        return await db_operations.get_operation(
            self.pool, operation_name(name), owner_filter(principal)
        )

    async def follow(
        self,
        principal: Principal,
        name: str,
        *,
        seen_stage: int | None = None,
        max_wait: float = 24 * 3600,
        queued: tuple[OperationRecord, Mark] | None = None,
    ) -> AsyncIterator[OperationRecord]:
        """Yield the operation at every stage change (from `seen_stage` on) until it is done.

        `queued`: the operation of a task the caller has just queued (`queued_operation`)
        and the notification mark it took before queueing; the operation is then not read
        until a notification says more than a lease."""
        name = operation_name(name)
        owner = owner_filter(principal)
        deadline = time.monotonic() + max_wait
        last_stage = seen_stage
        if queued is None:
            # Changes committed after the mark are notified: none is missed by the read.
            since = self.notifications.mark()
            record = await self._read(name, owner)
        else:
            record, since = queued
        if record.task_id is None:
            yield record
            return
        with self.notifications.watching_task(record.task_id, since) as watch:
            while True:
                stage = stage_of(record)
                if stage != last_stage or record.done:
                    yield record
                    last_stage = stage
                if record.done:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                await self.notifications.wait_for_change(watch, remaining)
                recheck, lease = watch.take()
                if recheck:
                    record = await self._read(name, owner)
                elif lease is not None:
                    record = replace(
                        record,
                        task_state="leased",
                        worker_id=lease.worker_name,  # shown only; the notification has no id
                        worker_name=lease.worker_name,
                        queued_at=lease.queued_at,
                        leased_at=lease.leased_at,
                    )

    async def _read(self, name: str, owner) -> OperationRecord:
        """The operation; through a database outage, retried for `outage_patience` seconds."""
        give_up = time.monotonic() + self.outage_patience
        delay = 0.25
        while True:
            try:
                return await db_operations.get_operation(self.pool, name, owner)
            except Exception as exc:
                if not is_database_outage(exc):
                    raise
                if time.monotonic() + delay > give_up:
                    raise outage_error(exc) from exc
                # Pooled connections may all be dead: open fresh ones on the next try.
                await self.pool.expire_connections()
                log.info("Operation %s: database unavailable (%s); retrying", name, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def cancel(self, principal: Principal, name: str) -> None:
        """Cancel the operation; its task too when no other operation waits on it."""
        task_cancelled = await db_operations.cancel_operation(
            self.pool, operation_name(name), owner_filter(principal)
        )
        log.info("Operation %s cancelled%s", name, " with its task" if task_cancelled else "")

    async def delete(self, principal: Principal, name: str) -> None:
        await db_operations.delete_operation(
            self.pool, operation_name(name), owner_filter(principal)
        )

    async def list(
        self, principal: Principal, filter_text: str, page_size: int, page_token: str
    ) -> OperationPage:
        """Newest first, `page_size` at most (default 100, never more than MAX_LIST_PAGE);
        only the principal's own operations unless it is an admin."""
        if page_size < 0:
            raise InvalidArgument(f"page_size {page_size} is negative")
        limit = min(page_size or 100, MAX_LIST_PAGE)
        records = await db_operations.list_operations(
            self.pool,
            stage=_list_filter(filter_text),
            limit=limit,
            after=_after(page_token),
            owner=owner_filter(principal),
        )
        next_token = _page_token(records[-1]) if len(records) == limit else ""
        return OperationPage(records, next_token)


@dataclass(frozen=True)
class OperationPage:
    records: list[OperationRecord]
    next_page_token: str


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
        f"unsupported filter {quoted(text)}; use state=queued, state=executing or state=completed"
    )


def _page_token(record: OperationRecord) -> str:
    created = record.created_at.isoformat() if record.created_at else ""  # listed rows have one
    raw = f"{created}|{record.name}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def _after(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        created, name = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        if "\x00" not in name:
            return datetime.fromisoformat(created), name
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidArgument(f"page_token {quoted(token)} was not issued by this server")
