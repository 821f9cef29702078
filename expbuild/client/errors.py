"""Turning gRPC failures and google.rpc.Status values into `expbuild.errors` types.

The mapping is the inverse of `expbuild.server.status`: a status the server produced from
a domain error comes back as the same domain error class with the server's message, and
a FAILED_PRECONDITION keeps its `PreconditionFailure` violations. Codes without a domain
class become `RemoteError`, which keeps the gRPC code for callers that branch on it.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from expbuild import errors
from expbuild.errors import ExpBuildError, Violation

_STATUS_DETAILS_KEY = "grpc-status-details-bin"

_DOMAIN_ERRORS: dict[grpc.StatusCode, type[ExpBuildError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRange,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
}

_CODES_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


class RemoteError(ExpBuildError):
    """A failure reported by (or on the way to) the server with no more specific domain type.

    `code` is the gRPC status code, e.g. UNAVAILABLE when the server cannot be reached,
    DEADLINE_EXCEEDED when an action ran past its timeout, DATA_LOSS when a blob the
    server sent does not match its digest.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_code(number: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` for a google.rpc.Code number (UNKNOWN for numbers not defined)."""
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def _violations(details: list[any_pb2.Any]) -> list[Violation]:
    found: list[Violation] = []
    for detail in details:
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            found.extend(Violation(v.type, v.subject, v.description) for v in failure.violations)
    return found


def _error(
    code: grpc.StatusCode,
    message: str,
    details: list[any_pb2.Any],
    target: str | None,
    context: str = "",
) -> ExpBuildError:
    prefix = f"{context}: " if context else ""
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return errors.FailedPrecondition(prefix + message, _violations(details))
    domain = _DOMAIN_ERRORS.get(code)
    if domain is not None:
        return domain(prefix + message)
    where = f"the server at {target}" if target else "the server"
    if code == grpc.StatusCode.UNAVAILABLE:
        # Not prefixed: which call found the server gone does not help the user.
        return RemoteError(
            code,
            f"{where} is unreachable ({message}); check that it is running and that "
            "--server (or EXPBUILD_SERVER) names its host:port",
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return RemoteError(
            code,
            f"{prefix}{where} does not implement this call ({message}); check that "
            "--server points at an ExpBuild or other REAPI v2 server",
        )
    suffix = f": {message}" if message else ""
    return RemoteError(code, f"{prefix}{where} answered {code.name}{suffix}")


def from_status(status: status_pb2.Status, context: str = "") -> ExpBuildError:
    """The error a non-OK google.rpc.Status stands for.

    `context`, when given, is prefixed to the server's message ("uploading blob X: ...").
    Calling this with an OK status is a programming error and raises ValueError.
    """
    if status.code == 0:
        raise ValueError("from_status called with an OK status")
    code = status_code(status.code)
    if code in _DOMAIN_ERRORS:
        return _error(code, status.message, list(status.details), None, context)
    # A status inside a response describes the work (e.g. an action that timed out), not
    # the connection, so it is reported as the server worded it.
    prefix = f"{context}: " if context else ""
    return RemoteError(code, prefix + (status.message or code.name))


def from_rpc_error(
    e: grpc.aio.AioRpcError, target: str | None = None, context: str = ""
) -> ExpBuildError:
    """The error a failed RPC stands for, keeping the server's message.

    `target` (host:port) makes UNAVAILABLE and other transport messages name the server;
    `context`, when given, is prefixed to the message ("reading blob X: ..."), except for
    UNAVAILABLE. PreconditionFailure details are read from the `grpc-status-details-bin` trailer.
    """
    details: list[any_pb2.Any] = []
    for key, value in e.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:
                # A malformed trailer must not hide the error itself.
                continue
            details.extend(status.details)
    return _error(e.code(), e.details() or "", details, target, context)
