"""The ActionCache service."""

from __future__ import annotations

import logging

import asyncpg

from expbuild.cas.action_results import inline_outputs, missing_blobs
from expbuild.cas.store import FileStore
from expbuild.config import ServerSettings
from expbuild.db import action_cache
from expbuild.digest import Digest
from expbuild.errors import FailedPrecondition, NotFound, PermissionDenied, Violation
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.server.convert import digest_field
from expbuild.server.instances import InstanceNames
from expbuild.server.metrics import ACTION_CACHE_LOOKUPS
from expbuild.server.status import rpc

log = logging.getLogger(__name__)


async def complete_action_result(
    pool: asyncpg.Pool, store: FileStore, instance: str, digest: Digest, *, method: str
) -> re_pb2.ActionResult | None:
    """The cached result for the action, or None when absent or some output left the CAS.

    Counted as a hit or a miss of `method` (GetActionResult, Execute) in the metrics.
    """
    result = await _lookup(pool, store, instance, digest)
    ACTION_CACHE_LOOKUPS.labels(method, "miss" if result is None else "hit").inc()
    return result


async def _lookup(
    pool: asyncpg.Pool, store: FileStore, instance: str, digest: Digest
) -> re_pb2.ActionResult | None:
    raw = await action_cache.get_action_result(pool, instance, digest)
    if raw is None:
        return None
    result = re_pb2.ActionResult.FromString(raw)
    missing = await missing_blobs(store, result)
    if missing:
        log.info(
            "Action cache entry for %s is incomplete (%d blob(s) gone); treating as a miss",
            digest,
            len(missing),
        )
        return None
    return result


class ActionCacheServicer(re_grpc.ActionCacheServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: FileStore,
        instances: InstanceNames,
        settings: ServerSettings,
    ):
        self.pool = pool
        self.store = store
        self.instances = instances
        self.settings = settings

    @rpc
    async def GetActionResult(self, request: re_pb2.GetActionResultRequest, context):
        instance = self.instances.check(request.instance_name)
        digest = digest_field(request.action_digest, "action_digest")
        result = await complete_action_result(
            self.pool, self.store, instance, digest, method="GetActionResult"
        )
        if result is None:
            raise NotFound(f"no action result for {digest}")
        await inline_outputs(
            self.store,
            result,
            stdout=request.inline_stdout,
            stderr=request.inline_stderr,
            files=request.inline_output_files,
        )
        return result

    @rpc
    async def UpdateActionResult(self, request: re_pb2.UpdateActionResultRequest, context):
        instance = self.instances.check(request.instance_name)
        digest = digest_field(request.action_digest, "action_digest")
        if not self.settings.allow_action_cache_updates:
            raise PermissionDenied(
                "this server does not accept action results from clients "
                "([server] allow_action_cache_updates = false)"
            )
        missing = await missing_blobs(self.store, request.action_result)
        if missing:
            raise FailedPrecondition(
                f"the action result names {len(missing)} blob(s) that are not in the CAS; "
                "upload the outputs first",
                [Violation("MISSING", f"blobs/{d.hash}/{d.size_bytes}") for d in missing],
            )
        await action_cache.put_action_result(
            self.pool, instance, digest, request.action_result.SerializeToString()
        )
        return request.action_result
