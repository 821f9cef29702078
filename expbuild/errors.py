"""Domain errors. Each class carries its google.rpc code; `expbuild.reapi.status` is the
one table between these classes and google.rpc.Status (both ways), and
`expbuild.server.status` turns a raised one into the gRPC status of a call.

Code below the servicers raises these; it never imports grpc to signal a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.rpc import code_pb2


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


class Unavailable(ExpBuildError):
    """A dependency (the database) is away for now; the client should retry."""

    code = code_pb2.UNAVAILABLE


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


class RemoteError(ExpBuildError):
    """A failure reported by (or on the way to) the server with no more specific class.

    `code` is the google.rpc code, e.g. UNAVAILABLE when the server cannot be reached,
    DEADLINE_EXCEEDED when an action ran past its timeout, DATA_LOSS when a blob the
    server sent does not match its digest.
    """

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
