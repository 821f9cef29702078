"""Running actions through the REAPI Execution service."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc
from google.longrunning import operations_pb2
from google.rpc import code_pb2

from expbuild.client.channel import channel_target
from expbuild.client.errors import from_rpc_error
from expbuild.digest import Digest
from expbuild.errors import ExpBuildError, RemoteError
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.reapi.status import from_status

log = logging.getLogger(__name__)

# After this many consecutive reconnections that brought no operation update, give up.
_RECONNECT_ATTEMPTS = 6
_FIRST_BACKOFF_SECONDS = 0.5
_MAX_BACKOFF_SECONDS = 8.0


def operation_metadata(
    operation: operations_pb2.Operation,
) -> re_pb2.ExecuteOperationMetadata | None:
    """The operation's ExecuteOperationMetadata, or None if it carries none (or another type)."""
    if not operation.HasField("metadata"):
        return None
    metadata = re_pb2.ExecuteOperationMetadata()
    if not operation.metadata.Unpack(metadata):
        return None
    return metadata


def execute_response(operation: operations_pb2.Operation) -> re_pb2.ExecuteResponse:
    """The ExecuteResponse of a done operation; raises the mapped error if it failed.

    An operation-level `error` (e.g. FAILED_PRECONDITION for missing inputs, with its
    violations) raises the matching `ExpBuildError`. A non-OK `ExecuteResponse.status` is
    *not* raised here: the response may still hold a partial result (see `response_error`).
    """
    if operation.HasField("error") and operation.error.code != 0:
        raise from_status(operation.error)
    response = re_pb2.ExecuteResponse()
    if not operation.HasField("response") or not operation.response.Unpack(response):
        raise RemoteError(
            code_pb2.INTERNAL,
            f"operation {operation.name} finished without an ExecuteResponse",
        )
    return response


def response_error(response: re_pb2.ExecuteResponse) -> ExpBuildError | None:
    """The error a non-OK `ExecuteResponse.status` stands for (e.g. `RemoteError` with
    DEADLINE_EXCEEDED when the action timed out), or None when the status is OK."""
    if response.status.code == 0:
        return None
    return from_status(response.status)


class ExecutionClient:
    """Execute and WaitExecution calls for one instance of one server.

    Streams survive a dropped connection or a server that ends a stream early: the client
    reattaches with WaitExecution to the last operation it heard of. Errors surface as
    `ExpBuildError` subclasses.
    """

    def __init__(self, channel: grpc.aio.Channel, instance_name: str = ""):
        self.instance_name = instance_name
        self._stub = re_grpc.ExecutionStub(channel)
        self._target = channel_target(channel)

    async def stream(
        self,
        action_digest: Digest,
        *,
        skip_cache_lookup: bool = False,
        priority: int = 0,
    ) -> AsyncIterator[operations_pb2.Operation]:
        """Every operation update for the action, ending with the one that has done=true.

        If the Execute stream fails before any operation was received, the error is
        raised as is (e.g. `RemoteError` UNAVAILABLE when the server is unreachable).
        """
        request = re_pb2.ExecuteRequest(
            instance_name=self.instance_name,
            action_digest=action_digest.to_proto(),
            skip_cache_lookup=skip_cache_lookup,
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        if priority:
            request.execution_policy.priority = priority
        start = functools.partial(self._stub.Execute, request)
        async with contextlib.aclosing(self._follow(start, "")) as ops:
            async for operation in ops:
                yield operation

    async def _follow(
        self, first_call: Callable[[], grpc.aio.UnaryStreamCall], name: str
    ) -> AsyncGenerator[operations_pb2.Operation, None]:
        start = first_call
        quiet_attempts = 0
        while True:
            call = start()
            heard = False
            try:
                async for operation in call:
                    heard = True
                    quiet_attempts = 0
                    name = operation.name or name
                    yield operation
                    if operation.done:
                        return
                failure: grpc.aio.AioRpcError | None = None
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or not name:
                    raise from_rpc_error(e, self._target) from None
                failure = e
            finally:
                call.cancel()
            # The stream ended (or broke) before the operation finished: reattach to it.
            if not name:
                raise RemoteError(
                    code_pb2.INTERNAL,
                    "the server ended the Execute stream without naming an operation",
                )
            if not heard:
                quiet_attempts += 1
                if quiet_attempts > _RECONNECT_ATTEMPTS:
                    if failure is not None:
                        raise from_rpc_error(failure, self._target) from None
                    raise RemoteError(
                        code_pb2.UNAVAILABLE,
                        f"operation {name}: the server keeps ending WaitExecution streams "
                        "without reporting progress",
                    )
                delay = _FIRST_BACKOFF_SECONDS * 2 ** (quiet_attempts - 1)
                await asyncio.sleep(min(delay, _MAX_BACKOFF_SECONDS))
            elif failure is not None:
                await asyncio.sleep(_FIRST_BACKOFF_SECONDS)
            log.info(
                "Reattaching to operation %s (%s)",
                name,
                f"stream broke: {failure.code().name}" if failure else "stream ended early",
            )
            start = functools.partial(
                self._stub.WaitExecution, re_pb2.WaitExecutionRequest(name=name)
            )

    async def execute(
        self,
        action_digest: Digest,
        *,
        skip_cache_lookup: bool = False,
        priority: int = 0,
        on_stage: Callable[[int], None] | None = None,
        on_metadata: Callable[[re_pb2.ExecuteOperationMetadata], None] | None = None,
    ) -> re_pb2.ExecuteResponse:
        """Run the action (or fetch its cached result) and return the final ExecuteResponse.

        `on_stage` is called with each new `ExecutionStage.Value` as it is first reported;
        `on_metadata` with every ExecuteOperationMetadata received (e.g. to learn the
        worker from `partial_execution_metadata`). Operation-level errors raise (see
        `execute_response`); a non-OK `response.status` is returned for the caller to judge
        (see `response_error`).
        """
        operations = self.stream(
            action_digest, skip_cache_lookup=skip_cache_lookup, priority=priority
        )
        return await self._final_response(operations, on_stage, on_metadata)

    async def wait(
        self,
        operation_name: str,
        *,
        on_stage: Callable[[int], None] | None = None,
        on_metadata: Callable[[re_pb2.ExecuteOperationMetadata], None] | None = None,
    ) -> re_pb2.ExecuteResponse:
        """Attach to a running operation by name and return its final ExecuteResponse
        (same error behaviour as `execute`; `NotFound` if the server does not know it)."""
        request = re_pb2.WaitExecutionRequest(name=operation_name)
        operations = self._follow(
            functools.partial(self._stub.WaitExecution, request), operation_name
        )
        return await self._final_response(operations, on_stage, on_metadata)

    @staticmethod
    async def _final_response(
        operations: AsyncIterator[operations_pb2.Operation],
        on_stage: Callable[[int], None] | None,
        on_metadata: Callable[[re_pb2.ExecuteOperationMetadata], None] | None,
    ) -> re_pb2.ExecuteResponse:
        last_stage: int | None = None
        async with contextlib.aclosing(operations) as ops:  # type: ignore[type-var]
            async for operation in ops:
                metadata = operation_metadata(operation)
                if metadata is not None:
                    if on_metadata is not None:
                        on_metadata(metadata)
                    if on_stage is not None and metadata.stage != last_stage:
                        last_stage = metadata.stage
                        on_stage(metadata.stage)
                if operation.done:
                    return execute_response(operation)
        raise RemoteError(code_pb2.INTERNAL, "the operation stream ended before it was done")
