"""Domain errors. Each maps to exactly one gRPC status code in `expbuild.server.status`.

Code below the servicers raises these; it never imports grpc to signal a failure.
"""

from __future__ import annotations

from dataclasses import dataclass


class ExpBuildError(Exception):
    """Base of every error that carries a meaning for a client."""


class InvalidArgument(ExpBuildError):
    """The request itself is malformed (bad digest, bad path, bad resource name)."""


class NotFound(ExpBuildError):
    """A named thing (blob, operation, action result) does not exist."""


class OutOfRange(ExpBuildError):
    """An offset or limit lies outside the data it addresses."""


class AlreadyExists(ExpBuildError):
    """The thing being created exists already."""


class ResourceExhausted(ExpBuildError):
    """A size or count limit was hit."""


class PermissionDenied(ExpBuildError):
    """The operation is switched off by configuration."""


class Aborted(ExpBuildError):
    """A concurrency check failed: e.g. a worker reported with a lease token that is no longer current."""


@dataclass
class Violation:
    """One entry of a google.rpc.PreconditionFailure."""

    type: str
    subject: str
    description: str = ""


class FailedPrecondition(ExpBuildError):
    """The system is not in a state the request needs (e.g. inputs missing from the CAS)."""

    def __init__(self, message: str, violations: list[Violation] | None = None):
        super().__init__(message)
        self.violations: list[Violation] = violations or []
