"""Submitting an action (Execute): answer from the action cache, or queue a task.

A cached answer is recorded as a finished operation; otherwise the Action and Command are
read and checked, and the task is queued, or joined when the same cacheable action is in
flight already. Either way the caller gets an operation name that any replica can follow.
The operation belongs to the submitting principal (see `expbuild.scheduling.operations`);
a joined task is shared, but each submitter gets an operation of its own.

A queued task records the client's RequestMetadata and takes its turn in the queue as part
of its build (`invocation_key`, docs/scheduling.md).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import asyncpg
from google.rpc import code_pb2, status_pb2

from expbuild.auth.principal import Principal
from expbuild.cas.action_results import inline_outputs
from expbuild.cas.store import FileStore
from expbuild.config import ServerSettings
from expbuild.db import operations as db_operations
from expbuild.db import queue
from expbuild.digest import Digest
from expbuild.errors import ResourceExhausted
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.request_metadata import RequestMetadata
from expbuild.scheduling.actions import (
    check_command,
    check_working_directory,
    effective_timeout,
    load_action,
)
from expbuild.scheduling.cached_results import lookup_cached_result
from expbuild.scheduling.platforms import PlatformOffers, check_platform_offered
from expbuild.text import quoted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inline:
    """Which outputs the client wants inlined in the response (up to a size budget)."""

    stdout: bool = False
    stderr: bool = False
    files: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.stdout or self.stderr or bool(self.files)


@dataclass(frozen=True)
class Submitted:
    operation_name: str
    action_digest: Digest
    outcome: str  # "cache_hit", "queued" (a new task) or "joined" (an in-flight one)
    cached: re_pb2.ExecuteResponse | None = None  # the whole answer, for a cache hit
    task_id: int | None = None


async def inline_into(store: FileStore, response: re_pb2.ExecuteResponse, inline: Inline) -> None:
    """Fill the response's result with the outputs `inline` asks for."""
    if inline and response.HasField("result"):
        await inline_outputs(
            store,
            response.result,
            stdout=inline.stdout,
            stderr=inline.stderr,
            files=inline.files,
        )


def invocation_key(
    metadata: RequestMetadata | None, principal: Principal, *, fair: bool = True
) -> str:
    """Whose turn a task is: its build (the tool's invocation id, else the correlated
    invocations id), else the caller's credential (`principal:<name>`), else '' (anonymous).
    Without fair scheduling every task is the one line's ('')."""
    if not fair:
        return ""
    if metadata is not None:
        build = metadata.tool_invocation_id or metadata.correlated_invocations_id
        if build:
            return build
    return f"principal:{principal.name}" if principal.name else ""


async def check_queue_room(pool: asyncpg.Pool, instance: str, limit: int) -> None:
    """Refuse a new action while `limit` tasks of the instance wait in the queue: a burst
    beyond what the workers can take is pushed back to the clients (they retry) instead of
    growing the queue without bound. Concurrent Executes may overshoot by a few."""
    if await queue.count_queued(pool, instance, limit) >= limit:
        raise ResourceExhausted(
            f"instance {quoted(instance)} has {limit} actions queued, the most "
            "[server] max_queued_tasks allows; retry later"
        )


async def submit_action(
    pool: asyncpg.Pool,
    store: FileStore,
    settings: ServerSettings,
    principal: Principal,
    *,
    instance: str,
    digest: Digest,
    skip_cache_lookup: bool = False,
    priority: int = 0,
    inline: Inline = Inline(),
    offers: PlatformOffers | None = None,
    request_metadata: RequestMetadata | None = None,
) -> Submitted:
    """Answer the action from the cache or queue it; the operation exists on return,
    owned by `principal`.

    `offers` is the replica's memory of offered platforms (asked afresh without it);
    `request_metadata` the client's header, recorded with a queued task."""
    operation_name = str(uuid.uuid4())
    if not skip_cache_lookup:
        cached = await lookup_cached_result(pool, store, instance, digest)
        if cached is not None:
            response = re_pb2.ExecuteResponse(
                result=cached, cached_result=True, status=status_pb2.Status(code=code_pb2.OK)
            )
            await inline_into(store, response, inline)
            await db_operations.insert_cached_operation(
                pool,
                operation_name,
                instance,
                digest,
                response.SerializeToString(),
                principal=principal.name,
            )
            log.info("Action %s answered from the action cache", digest)
            return Submitted(operation_name, digest, "cache_hit", cached=response)

    loaded = await load_action(store, digest)
    check_command(loaded.command)
    await check_working_directory(store, loaded)
    platform = loaded.platform
    timeout = effective_timeout(loaded.action, settings.max_action_timeout)
    if settings.reject_unmatched_platforms:
        if offers is not None:
            await offers.check(pool, platform)
        else:
            await check_platform_offered(pool, platform)
    if settings.max_queued_tasks:
        await check_queue_room(pool, instance, settings.max_queued_tasks)
    enqueued = await queue.enqueue(
        pool,
        queue.NewTask(
            instance_name=instance,
            action_digest=digest,
            platform=platform,
            priority=priority,
            do_not_cache=loaded.action.do_not_cache,
            timeout=timeout,
            max_attempts=settings.max_attempts,
            invocation_key=invocation_key(
                request_metadata, principal, fair=settings.fair_scheduling
            ),
            request_metadata=request_metadata.as_dict() if request_metadata else None,
        ),
        operation_name,
        principal=principal.name,
    )
    if enqueued.is_new:
        log.info(
            "Task task-%d submitted to queue (action %s, priority %d)",
            enqueued.task_id,
            digest,
            priority,
        )
    else:
        log.info("Action %s joined in-flight task task-%d", digest, enqueued.task_id)
    outcome = "queued" if enqueued.is_new else "joined"
    return Submitted(operation_name, digest, outcome, task_id=enqueued.task_id)
