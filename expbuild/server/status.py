"""The one place where domain errors become gRPC statuses.

Servicer methods are wrapped with `@rpc`: an `ExpBuildError` raised below becomes the
matching status with the error's message (and, for FailedPrecondition, the REAPI
`PreconditionFailure` details); anything else is logged with its traceback and becomes
INTERNAL, so one bad request never takes the server down.
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from expbuild import errors

log = logging.getLogger(__name__)

CODES: dict[type[errors.ExpBuildError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


def grpc_code(error: BaseException) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def rpc_status(error: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for `error` (used inside Operation.error and ExecuteResponse)."""
    code = grpc_code(error)
    status = status_pb2.Status(code=code.value[0], message=str(error))
    if isinstance(error, errors.FailedPrecondition) and error.violations:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=v.type, subject=v.subject, description=v.description
                )
                for v in error.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(failure)
        status.details.append(detail)
    return status


def ok_status() -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.OK)


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, method: str):
    code = grpc_code(error)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error in %s", method, exc_info=error)
        message = f"internal error in {method}: {error}"
    else:
        log.info("%s: %s: %s", method, code.name, error)
        message = str(error)
    status = rpc_status(error)
    status.code = code.value[0]
    status.message = message
    if status.details:
        # Clients (Bazel) read PreconditionFailure from the grpc-status-details-bin trailer.
        context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    await context.abort(code, message)


def rpc(method):
    """Map domain errors raised by a unary or streaming servicer method to gRPC statuses."""
    name = method.__qualname__

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except errors.ExpBuildError as exc:
                await _abort(context, exc, name)
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - the last line of defence
                await _abort(context, exc, name)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except errors.ExpBuildError as exc:
            await _abort(context, exc, name)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            await _abort(context, exc, name)

    return unary_wrapper
