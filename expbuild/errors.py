"""Domain errors. Each class carries its google.rpc code; `expbuild.server.status` turns a
raised one into the gRPC status of a call, `rpc_status` into a google.rpc.Status message
(for a status that travels inside a response, such as ExecuteResponse.status).

Code below the servicers raises these; it never imports grpc to signal a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


class ExpBuildError(Exception):
    """Base of every error that carries a meaning for a client."""

    code: int = code_pb2.INTERNAL


class InvalidArgument(ExpBuildError):
    """The request itself is malformed (bad digest, bad path, bad resource name)."""

    code = code_pb2.INVALID_ARGUMENT


class NotFound(ExpBuildError):
    """A named thing (blob, operation, action result) does not exist."""

    code = code_pb2.NOT_FOUND


class OutOfRange(ExpBuildError):
    """An offset or limit lies outside the data it addresses."""

    code = code_pb2.OUT_OF_RANGE


class AlreadyExists(ExpBuildError):
    """The thing being created exists already."""

    code = code_pb2.ALREADY_EXISTS


class ResourceExhausted(ExpBuildError):
    """A size or count limit was hit."""

    code = code_pb2.RESOURCE_EXHAUSTED


class PermissionDenied(ExpBuildError):
    """The caller may not do this: switched off by configuration, or not its to do
    (another credential's worker, a token limited to other instances)."""

    code = code_pb2.PERMISSION_DENIED


class Aborted(ExpBuildError):
    """A concurrency check failed: e.g. a worker reported with a lease token that is no longer current."""

    code = code_pb2.ABORTED


@dataclass
class Violation:
    """One entry of a google.rpc.PreconditionFailure."""

    type: str
    subject: str
    description: str = ""


class FailedPrecondition(ExpBuildError):
    """The system is not in a state the request needs (e.g. inputs missing from the CAS)."""

    code = code_pb2.FAILED_PRECONDITION

    def __init__(self, message: str, violations: list[Violation] | None = None):
        super().__init__(message)
        self.violations: list[Violation] = violations or []


def rpc_status(error: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for `error`, with REAPI's PreconditionFailure details.

    Anything that is not an `ExpBuildError` is INTERNAL."""
    code = error.code if isinstance(error, ExpBuildError) else code_pb2.INTERNAL
    status = status_pb2.Status(code=code, message=str(error))
    if isinstance(error, FailedPrecondition) and error.violations:
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
