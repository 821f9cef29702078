"""The ActionCache service over `expbuild.scheduling.cached_results`."""

from __future__ import annotations

import asyncpg
import grpc

from expbuild.cas.action_results import inline_outputs
from expbuild.cas.store import FileStore
from expbuild.config import ServerSettings
from expbuild.digest import check_digest_function, digest_field
from expbuild.errors import NotFound
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.scheduling.cached_results import lookup_cached_result, store_client_result
from expbuild.server.instances import InstanceNames
from expbuild.server.metrics import ACTION_CACHE_LOOKUPS
from expbuild.server.status import rpc


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
    async def GetActionResult(
        self, request: re_pb2.GetActionResultRequest, context: grpc.aio.ServicerContext
    ):
        instance = self.instances.check(request.instance_name)
        check_digest_function(request.digest_function)
        digest = digest_field(request.action_digest, "action_digest")
        result = await lookup_cached_result(self.pool, self.store, instance, digest)
        ACTION_CACHE_LOOKUPS.labels("GetActionResult", "miss" if result is None else "hit").inc()
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
    async def UpdateActionResult(
        self, request: re_pb2.UpdateActionResultRequest, context: grpc.aio.ServicerContext
    ):
        instance = self.instances.check(request.instance_name)
        check_digest_function(request.digest_function)
        digest = digest_field(request.action_digest, "action_digest")
        await store_client_result(
            self.pool,
            self.store,
            instance,
            digest,
            request.action_result,
            updates_allowed=self.settings.allow_action_cache_updates,
        )
        return request.action_result
