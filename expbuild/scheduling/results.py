"""Accepting results: a worker reports a task's ExecuteResponse, or hands the lease back.

Both are fenced by the lease token (`expbuild.db.queue`): a stale worker's late report
changes nothing and is refused with `Aborted`. And both act for a worker only when the
caller is the credential that registered it (`expbuild.scheduling.workers.acting_worker`).

A report may carry blobs its result names inline (up to `MAX_INLINE_BLOB_BYTES`), saving
the worker its uploads. The worker is not trusted: every inline blob is checked against
its digest, and a result is accepted only when every blob it names is inline or already
in the CAS; otherwise nothing is written. The inline blobs reach the CAS before the lease
is checked, so a stale worker's may stay there (valid content, like any upload).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from google.rpc import code_pb2

from expbuild.auth.principal import Principal
from expbuild.cas.action_results import store_reported_blobs
from expbuild.cas.store import FileStore
from expbuild.db import queue
from expbuild.digest import Digest, digest_field
from expbuild.errors import FailedPrecondition, InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import worker_pb2
from expbuild.reapi.status import missing_blob, status_name
from expbuild.scheduling.cached_results import check_result_digests
from expbuild.scheduling.completions import CompletionBatcher
from expbuild.scheduling.task_names import task_name
from expbuild.scheduling.workers import acting_worker
from expbuild.text import check_no_nul, shorten

log = logging.getLogger(__name__)

# The inline blobs one CompleteTask may carry, data bytes in all (workers learn it when
# they register): small outputs and logs, well under a gRPC message.
MAX_INLINE_BLOB_BYTES = 1024 * 1024


@dataclass(frozen=True)
class AcceptedResult:
    succeeded: bool
    task: queue.CompletedTask  # when it was queued, leased and completed (for metrics)


async def accept_result(
    pool: asyncpg.Pool,
    store: FileStore,
    completions: CompletionBatcher,
    principal: Principal,
    worker_id: str,
    task_id: int,
    lease_token: str,
    response: re_pb2.ExecuteResponse,
    inline_blobs: Sequence[worker_pb2.InlineBlob] = (),
) -> AcceptedResult:
    """Finish the task with the worker's response: whether the run succeeded, and when.

    The inline blobs go to the CAS first (`InvalidArgument` naming one that does not match
    its digest, or that the response does not name; `FailedPrecondition` with a MISSING
    violation per blob the response names that is neither inline nor in the CAS).
    Only a successful run that exited 0 goes to the action cache (the task's
    do_not_cache is honoured by the statement)."""
    worker_id = await acting_worker(pool, principal, worker_id)
    queue.check_lease_token(lease_token, task_id)
    blobs = _checked_inline_blobs(inline_blobs)
    if response.HasField("result"):
        check_result_digests(response.result)
    logs = [
        digest_field(entry.digest, f"response.server_logs[{name!r}].digest")
        for name, entry in sorted(response.server_logs.items())
        if entry.digest.hash
    ]
    # Hashing, checking and writing: on the loop when small, else one thread hop for all.
    named = len(blobs) + len(logs) + _named_outputs(response.result)
    if store.on_loop(named, sum(len(data) for _, data in blobs), writes=True):
        missing = store_reported_blobs(store, response.result, logs, blobs)
    else:
        missing = await asyncio.to_thread(store_reported_blobs, store, response.result, logs, blobs)
    if missing:
        raise FailedPrecondition(
            f"the result of task {task_name(task_id)} names {len(missing)} blob(s) that are "
            f"neither inline nor in the CAS, e.g. {missing[0]}",
            [missing_blob(d) for d in missing],
        )
    succeeded = response.status.code == 0 and response.HasField("result")
    cacheable = succeeded and response.result.exit_code == 0
    done = await completions.complete(
        queue.Completion(
            task_id,
            lease_token,
            succeeded=succeeded,
            response=response.SerializeToString(),
            cache_result=response.result.SerializeToString() if cacheable else None,
            detail={"exit_code": response.result.exit_code, "status": response.status.code},
            worker_id=worker_id,
        )
    )
    if response.status.code != code_pb2.OK:
        # The action did not run to an exit code (bad input, a limit, a timeout...).
        log.warning(
            "Task %s failed on worker %s: %s: %s",
            task_name(task_id),
            worker_id,
            status_name(response.status.code),
            shorten(response.status.message),
        )
    else:
        log.info(
            "Task %s completed on worker %s (exit code %d)",
            task_name(task_id),
            worker_id,
            response.result.exit_code,
        )
    return AcceptedResult(succeeded, done)


def _checked_inline_blobs(inline: Sequence[worker_pb2.InlineBlob]) -> list[tuple[Digest, bytes]]:
    """The inline blobs' digests parsed and their sizes checked (the hashes are checked
    with the writes, off the event loop)."""
    blobs = []
    total = 0
    for index, blob in enumerate(inline):
        digest = digest_field(blob.digest, f"inline_blobs[{index}].digest")
        if len(blob.data) != digest.size_bytes:
            raise InvalidArgument(
                f"inline blob {digest} (inline_blobs[{index}]) has {len(blob.data)} bytes, "
                f"its digest says {digest.size_bytes}"
            )
        total += len(blob.data)
        if total > MAX_INLINE_BLOB_BYTES:
            raise InvalidArgument(
                f"inline blobs exceed {MAX_INLINE_BLOB_BYTES} bytes (at inline blob {digest}, "
                f"inline_blobs[{index}]); upload the larger ones to the CAS"
            )
        blobs.append((digest, blob.data))
    return blobs


async def release_lease(
    pool: asyncpg.Pool,
    principal: Principal,
    worker_id: str,
    task_id: int,
    lease_token: str,
    reason: str,
) -> None:
    """Hand the lease back unrun: the task is queued again at once."""
    worker_id = await acting_worker(pool, principal, worker_id)
    reason = check_no_nul(reason, "reason") or "released by worker"
    await queue.release_task(pool, task_id, lease_token, worker_id, reason)
    log.info("Task %s handed back by worker %s: %s", task_name(task_id), worker_id, shorten(reason))


def _named_outputs(result: re_pb2.ActionResult) -> int:
    """How many blobs checking `result` looks at; unbounded (a thread's work) when it
    names output directories, whose trees are read and walked."""
    if result.output_directories:
        return sys.maxsize
    return 2 + len(result.output_files)
