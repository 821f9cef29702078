"""The Execution service: Execute and WaitExecution.

Execute answers from the action cache when it can; otherwise it checks that the action's
blobs are in the CAS, queues a task (or joins the identical in-flight one) and streams the
operation until done. Errors found before the operation exists are gRPC errors; errors of
the run itself travel in ExecuteResponse.status, as REAPI asks.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta

import asyncpg
from google.longrunning import operations_pb2
from google.protobuf import any_pb2

from expbuild.cas.action_results import inline_outputs
from expbuild.cas.store import FileStore
from expbuild.config import ServerSettings
from expbuild.db import operations as db_operations
from expbuild.db import queue, workers
from expbuild.digest import Digest
from expbuild.errors import FailedPrecondition, InvalidArgument, NotFound, Violation
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.server.action_cache import complete_action_result
from expbuild.server.convert import digest_field, platform_spec
from expbuild.server.instances import InstanceNames
from expbuild.server.metrics import EXECUTE_REQUESTS
from expbuild.server.operations import OperationTracker
from expbuild.server.status import ok_status, rpc

log = logging.getLogger(__name__)


def _missing(digest: Digest, what: str) -> Violation:
    return Violation(
        type="MISSING",
        subject=f"blobs/{digest.hash}/{digest.size_bytes}",
        description=f"{what} {digest} is not in the CAS",
    )


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

    async def _load_action(self, digest: Digest) -> tuple[re_pb2.Action, re_pb2.Command]:
        """Read the Action and Command; FAILED_PRECONDITION listing every missing blob."""
        try:
            action = re_pb2.Action.FromString(await self.store.get(digest))
        except NotFound:
            raise FailedPrecondition(
                f"action {digest} is not in the CAS; upload it before Execute",
                [_missing(digest, "action")],
            ) from None
        command_digest = digest_field(action.command_digest, "action.command_digest")
        root_digest = digest_field(action.input_root_digest, "action.input_root_digest")
        missing = await self.store.find_missing([command_digest, root_digest])
        if missing:
            violations = [
                _missing(d, "command" if d == command_digest else "input root") for d in missing
            ]
            raise FailedPrecondition(
                f"{len(missing)} blob(s) of action {digest} are not in the CAS", violations
            )
        command = re_pb2.Command.FromString(await self.store.get(command_digest))
        return action, command

    def _effective_timeout(self, action: re_pb2.Action) -> timedelta:
        maximum = self.settings.max_action_timeout
        if not action.HasField("timeout"):
            return maximum
        timeout = action.timeout.ToTimedelta()
        if timeout < timedelta(0):
            raise InvalidArgument(f"action timeout {timeout.total_seconds():g}s is negative")
        if timeout > maximum:
            raise InvalidArgument(
                f"action timeout {timeout.total_seconds():g}s exceeds this server's maximum of "
                f"{maximum.total_seconds():g}s ([server] max_action_timeout)"
            )
        return timeout or maximum

    async def _check_platform_offered(self, platform: dict[str, list[str]]) -> None:
        if not self.settings.reject_unmatched_platforms:
            return
        offered, any_online, offers = await workers.platform_offer(self.pool, platform)
        if offered or not any_online:
            return
        raise FailedPrecondition(
            f"no online worker offers platform {json.dumps(platform, sort_keys=True)}; "
            f"workers offer {json.dumps(offers, sort_keys=True)} "
            "(start a worker with matching [worker.platform], or set "
            "[server] reject_unmatched_platforms = false to queue it anyway)",
            [Violation("UNSATISFIABLE_PLATFORM", "platform", json.dumps(platform, sort_keys=True))],
        )

    @rpc
    async def Execute(self, request: re_pb2.ExecuteRequest, context):
        instance = self.instances.check(request.instance_name)
        digest = digest_field(request.action_digest, "action_digest")
        operation_name = str(uuid.uuid4())

        # Each stage is reported once the operation exists in the database, so a client
        # may switch to WaitExecution (on any replica) from the first message on.
        if not request.skip_cache_lookup:
            cached = await complete_action_result(
                self.pool, self.store, instance, digest, method="Execute"
            )
            if cached is not None:
                await inline_outputs(
                    self.store,
                    cached,
                    stdout=request.inline_stdout,
                    stderr=request.inline_stderr,
                    files=request.inline_output_files,
                )
                response = re_pb2.ExecuteResponse(
                    result=cached, cached_result=True, status=ok_status()
                )
                await db_operations.insert_cached_operation(
                    self.pool, operation_name, instance, digest, response.SerializeToString()
                )
                EXECUTE_REQUESTS.labels("cache_hit").inc()
                log.info("Action %s answered from the action cache", digest)
                yield _operation(operation_name, digest, re_pb2.ExecutionStage.CACHE_CHECK)
                yield _operation(operation_name, digest, re_pb2.ExecutionStage.COMPLETED, response)
                return

        action, command = await self._load_action(digest)
        platform = platform_spec(
            action.platform if action.platform.properties else command.platform,
            "action platform",
        )
        timeout = self._effective_timeout(action)
        await self._check_platform_offered(platform)
        enqueued = await queue.enqueue(
            self.pool,
            queue.NewTask(
                instance_name=instance,
                action_digest=digest,
                platform=platform,
                priority=request.execution_policy.priority,
                do_not_cache=action.do_not_cache,
                timeout=timeout,
                max_attempts=self.settings.max_attempts,
            ),
            operation_name,
        )
        EXECUTE_REQUESTS.labels("queued" if enqueued.is_new else "joined").inc()
        if enqueued.is_new:
            log.info(
                "Task task-%d submitted to queue (action %s, priority %d)",
                enqueued.task_id,
                digest,
                request.execution_policy.priority,
            )
        else:
            log.info("Action %s joined in-flight task task-%d", digest, enqueued.task_id)
        if not request.skip_cache_lookup:
            yield _operation(operation_name, digest, re_pb2.ExecutionStage.CACHE_CHECK)
        # Always report QUEUED, even if a worker leased the task before we read it back.
        yield _operation(operation_name, digest, re_pb2.ExecutionStage.QUEUED)
        async for operation in self.tracker.follow(
            operation_name, seen_stage=re_pb2.ExecutionStage.QUEUED
        ):
            yield await self._inlined(operation, request)

    @rpc
    async def WaitExecution(self, request: re_pb2.WaitExecutionRequest, context):
        async for operation in self.tracker.follow(request.name):
            yield operation

    async def _inlined(self, operation, request: re_pb2.ExecuteRequest):
        """Inline stdout/stderr/files into a done operation's result, as the client asked."""
        if not operation.done or not (
            request.inline_stdout or request.inline_stderr or request.inline_output_files
        ):
            return operation
        response = re_pb2.ExecuteResponse()
        operation.response.Unpack(response)
        if not response.HasField("result"):
            return operation
        await inline_outputs(
            self.store,
            response.result,
            stdout=request.inline_stdout,
            stderr=request.inline_stderr,
            files=request.inline_output_files,
        )
        operation.response.Pack(response)
        return operation


def _operation(
    name: str, digest: Digest, stage: int, response: re_pb2.ExecuteResponse | None = None
) -> operations_pb2.Operation:
    metadata = re_pb2.ExecuteOperationMetadata(stage=stage, action_digest=digest.to_proto())
    operation = operations_pb2.Operation(name=name, done=response is not None)
    operation.metadata.Pack(metadata)
    if response is not None:
        packed = any_pb2.Any()
        packed.Pack(response)
        operation.response.CopyFrom(packed)
    return operation
