"""The one error table: google.rpc.Status ⇄ `expbuild.errors`, for server, worker and client.

Each `ExpBuildError` class carries its google.rpc code; this module turns a raised error
into the Status that travels (`to_status`: a call's status on the server, an
ExecuteResponse.status on the worker, a per-blob status of a batch) and a Status that
arrived back into the same class (`from_status`: the client). A FAILED_PRECONDITION
carries REAPI's `PreconditionFailure` details; a missing or unusable blob is named by the
subject `blobs/{hash}/{size}` (`blob_subject`, read back by `parse_blob_subject`).
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2

from expbuild import errors
from expbuild.digest import Digest
from expbuild.errors import ExpBuildError, FailedPrecondition, RemoteError, Violation

# The trailer in which gRPC carries the whole google.rpc.Status (with its details) of a call.
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# A status code with a class of its own comes back as that class; any other as RemoteError.
_ERROR_CLASSES: dict[int, type[ExpBuildError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.OutOfRange,
        errors.AlreadyExists,
        errors.ResourceExhausted,
        errors.PermissionDenied,
        errors.Aborted,
        errors.FailedPrecondition,
    )
}

_GRPC_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

_BLOB_SUBJECT_PREFIX = "blobs/"


def blob_subject(digest: Digest) -> str:
    """The PreconditionFailure subject naming a blob: `blobs/{hash}/{size}`."""
    return f"{_BLOB_SUBJECT_PREFIX}{digest.hash}/{digest.size_bytes}"


def parse_blob_subject(subject: str) -> Digest:
    """The digest a `blobs/{hash}/{size}` subject names; InvalidArgument for anything else."""
    hash_, _, size = subject.removeprefix(_BLOB_SUBJECT_PREFIX).partition("/")
    if not subject.startswith(_BLOB_SUBJECT_PREFIX) or not size.isdigit():
        raise errors.InvalidArgument(
            f"violation subject {subject!r} does not name a blob as 'blobs/{{hash}}/{{size}}'"
        )
    return Digest(hash_, int(size))


def missing_blob(digest: Digest, description: str = "") -> Violation:
    """The REAPI MISSING violation that makes a client upload `digest` and try again."""
    return Violation("MISSING", blob_subject(digest), description)


def grpc_code(number: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` for a google.rpc.Code number (UNKNOWN for numbers not defined)."""
    return _GRPC_CODES.get(number, grpc.StatusCode.UNKNOWN)


def error_code(error: BaseException) -> int:
    """The google.rpc code of `error`: its class's (or RPC's) code, INTERNAL for anything else."""
    if isinstance(error, ExpBuildError):
        return error.code
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().value[0]
    return code_pb2.INTERNAL


def to_status(error: BaseException, message: str | None = None) -> status_pb2.Status:
    """The google.rpc.Status for `error` (the error's text unless `message` is given), with
    its PreconditionFailure details."""
    code = error_code(error)
    if message is None:
        if isinstance(error, grpc.aio.AioRpcError):  # a call's failure passed on as it came
            message = error.details() or grpc_code(code).name
        else:
            message = str(error)
    status = status_pb2.Status(code=code, message=message)
    if isinstance(error, FailedPrecondition) and error.violations:
        status.details.append(pack_violations(error.violations))
    return status


def ok_status() -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.OK)


def pack_violations(violations: list[Violation]) -> any_pb2.Any:
    """A PreconditionFailure holding `violations`, packed for google.rpc.Status.details."""
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=v.type, subject=v.subject, description=v.description
            )
            for v in violations
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(failure)
    return detail


def unpack_violations(details: list[any_pb2.Any]) -> list[Violation]:
    """Every PreconditionFailure violation among a Status's details (others are skipped)."""
    found: list[Violation] = []
    for detail in details:
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            found.extend(Violation(v.type, v.subject, v.description) for v in failure.violations)
    return found


def error_class(code: int) -> type[ExpBuildError] | None:
    """The domain class for a google.rpc code; None for codes without one."""
    return _ERROR_CLASSES.get(code)


def domain_error(code: int, message: str, details: list[any_pb2.Any]) -> ExpBuildError | None:
    """The domain error for `code` (FailedPrecondition with its violations); None when the
    code has no class of its own."""
    if code == code_pb2.FAILED_PRECONDITION:
        return FailedPrecondition(message, unpack_violations(details))
    cls = error_class(code)
    return cls(message) if cls is not None else None


def from_status(status: status_pb2.Status, context: str = "") -> ExpBuildError:
    """The error a non-OK google.rpc.Status stands for.

    `context`, when given, is prefixed to the message ("uploading blob X: ..."). Calling
    this with an OK status is a programming error and raises ValueError.
    """
    if status.code == code_pb2.OK:
        raise ValueError("from_status called with an OK status")
    prefix = f"{context}: " if context else ""
    error = domain_error(status.code, prefix + status.message, list(status.details))
    if error is not None:
        return error
    # A status inside a response describes the work (e.g. an action that timed out), not
    # the connection, so it is reported as the server worded it.
    return RemoteError(status.code, prefix + (status.message or grpc_code(status.code).name))


def status_trailer(status: status_pb2.Status) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries `status` whole (clients such as Bazel read
    PreconditionFailure from there)."""
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def trailer_details(metadata) -> list[any_pb2.Any]:
    """The Status details carried in a call's trailing metadata; a malformed trailer is
    skipped, so that it cannot hide the error itself."""
    details: list[any_pb2.Any] = []
    for key, value in metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:
                continue
            details.extend(status.details)
    return details
