"""The ActionCache service."""

from __future__ import annotations

import asyncpg

from expbuild.config import ServerSettings
from expbuild.db import action_cache
from expbuild.errors import NotFound, PermissionDenied
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.server.convert import digest_field
from expbuild.server.instances import InstanceNames
from expbuild.server.status import rpc


class ActionCacheServicer(re_grpc.ActionCacheServicer):
    def __init__(self, pool: asyncpg.Pool, instances: InstanceNames, settings: ServerSettings):
        self.pool = pool
        self.instances = instances
        self.settings = settings

    @rpc
    async def GetActionResult(self, request: re_pb2.GetActionResultRequest, context):
        instance = self.instances.check(request.instance_name)
        digest = digest_field(request.action_digest, "action_digest")
        result = await action_cache.get_action_result(self.pool, instance, digest)
        if result is None:
            raise NotFound(f"no action result for {digest}")
        return re_pb2.ActionResult.FromString(result)

    @rpc
    async def UpdateActionResult(self, request: re_pb2.UpdateActionResultRequest, context):
        instance = self.instances.check(request.instance_name)
        digest = digest_field(request.action_digest, "action_digest")
        if not self.settings.allow_action_cache_updates:
            raise PermissionDenied(
                "this server does not accept action results from clients "
                "([server] allow_action_cache_updates = false)"
            )
        await action_cache.put_action_result(
            self.pool, instance, digest, request.action_result.SerializeToString()
        )
        return request.action_result
