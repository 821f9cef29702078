"""The Execution service (Execute, WaitExecution) over `expbuild.scheduling`.

Errors found before the operation exists are gRPC errors; errors of the run itself travel
in ExecuteResponse.status, as REAPI asks.
"""

from __future__ import annotations

import asyncpg
import grpc
from google.longrunning import operations_pb2

from expbuild.auth.principal import current_principal
from expbuild.cas.store import FileStore
from expbuild.config import ServerSettings
from expbuild.digest import check_digest_function, digest_field
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.reapi.request_metadata import request_metadata_of
from expbuild.scheduling.operations import OperationTracker, queued_operation
from expbuild.scheduling.platforms import PlatformOffers
from expbuild.scheduling.submission import Inline, inline_into, submit_action
from expbuild.server.convert import operation, to_operation
from expbuild.server.instances import InstanceNames
from expbuild.server.metrics import ACTION_CACHE_LOOKUPS, EXECUTE_REQUESTS
from expbuild.server.status import rpc

Stage = re_pb2.ExecutionStage


class ExecutionServicer(re_grpc.ExecutionServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: FileStore,
        tracker: OperationTracker,
        instances: InstanceNames,
        settings: ServerSettings,
    ):
        self.pool = pool
        self.store = store
        self.tracker = tracker
        self.instances = instances
        self.settings = settings
        self.offers = PlatformOffers()  # this replica's, for every Execute it serves

    @rpc
    async def Execute(self, request: re_pb2.ExecuteRequest, context: grpc.aio.ServicerContext):
        check_digest_function(request.digest_function)
        inline = Inline(
            stdout=request.inline_stdout,
            stderr=request.inline_stderr,
            files=tuple(request.inline_output_files),
        )
        principal = current_principal()
        metadata = request_metadata_of(context.invocation_metadata())
        instance = self.instances.check(request.instance_name)
        # Before the task is queued: its stream then learns every change from notifications.
        mark = self.tracker.notifications.mark()
        submitted = await submit_action(
            self.pool,
            self.store,
            self.settings,
            principal,
            instance=instance,
            digest=digest_field(request.action_digest, "action_digest"),
            skip_cache_lookup=request.skip_cache_lookup,
            priority=request.execution_policy.priority,
            inline=inline,
            offers=self.offers,
            request_metadata=metadata,
        )
        EXECUTE_REQUESTS.labels(submitted.outcome).inc()
        if not request.skip_cache_lookup:
            hit = submitted.cached is not None
            ACTION_CACHE_LOOKUPS.labels("Execute", "hit" if hit else "miss").inc()
        name, digest = submitted.operation_name, submitted.action_digest
        # Each stage is reported once the operation exists in the database, so a client
        # may switch to WaitExecution (on any replica) from the first message on.
        if not request.skip_cache_lookup:
            yield operation(name, digest, Stage.CACHE_CHECK)
        if submitted.cached is not None:
            yield operation(name, digest, Stage.COMPLETED, submitted.cached)
            return
        # Always report QUEUED, even if a worker leased the task before we read it back.
        yield operation(name, digest, Stage.QUEUED)
        queued = None
        if submitted.outcome == "queued" and submitted.task_id is not None:
            # A new task: queued when the enqueue committed, so nothing to read back.
            record = queued_operation(name, instance, digest, submitted.task_id, principal)
            queued = (record, mark)
        async for record in self.tracker.follow(
            principal, name, seen_stage=Stage.QUEUED, queued=queued
        ):
            yield await self._inlined(to_operation(record), inline)

    @rpc
    async def WaitExecution(
        self, request: re_pb2.WaitExecutionRequest, context: grpc.aio.ServicerContext
    ):
        async for record in self.tracker.follow(current_principal(), request.name):
            yield to_operation(record)

    async def _inlined(
        self, message: operations_pb2.Operation, inline: Inline
    ) -> operations_pb2.Operation:
        """Inline outputs into a done operation's result, as the client asked."""
        if not message.done or not inline:
            return message
        response = re_pb2.ExecuteResponse()
        message.response.Unpack(response)
        await inline_into(self.store, response, inline)
        message.response.Pack(response)
        return message
