"""The one error table: what the server or worker packs, the client unpacks as the same error."""

from __future__ import annotations

import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from expbuild import errors
from expbuild.digest import digest_of
from expbuild.errors import FailedPrecondition, RemoteError, Violation
from expbuild.reapi.status import (
    blob_subject,
    from_status,
    missing_blob,
    parse_blob_subject,
    to_status,
    trailer_details,
)

D = digest_of(b"a blob")

DOMAIN_CLASSES = [
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.OutOfRange, code_pb2.OUT_OF_RANGE),
    (errors.AlreadyExists, code_pb2.ALREADY_EXISTS),
    (errors.ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    (errors.Aborted, code_pb2.ABORTED),
]


@pytest.mark.parametrize(("cls", "code"), DOMAIN_CLASSES)
def test_each_domain_error_travels_as_its_code_and_comes_back_as_its_class(cls, code):
    status = to_status(cls("what went wrong"))
    assert (status.code, status.message) == (code, "what went wrong")
    back = from_status(status, "reading blob X")
    assert type(back) is cls
    assert str(back) == "reading blob X: what went wrong"


def test_a_precondition_failure_keeps_its_violations_both_ways():
    violations = [missing_blob(D, "input root"), Violation("INVALID", "working_directory")]
    status = to_status(FailedPrecondition("2 problems", violations))
    assert status.code == code_pb2.FAILED_PRECONDITION
    # On the wire it is REAPI's PreconditionFailure, as Bazel reads it.
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [
        ("MISSING", f"blobs/{D.hash}/{D.size_bytes}"),
        ("INVALID", "working_directory"),
    ]
    back = from_status(status)
    assert isinstance(back, FailedPrecondition)
    assert back.violations == violations


def test_codes_without_a_class_keep_their_code():
    back = from_status(status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message="too slow"))
    assert isinstance(back, RemoteError)
    assert (back.code, str(back)) == (code_pb2.DEADLINE_EXCEEDED, "too slow")
    # ... and travel on unchanged when a worker passes one along.
    assert to_status(back) == status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message="too slow")
    # An empty message is replaced by the code's name, so the user reads something.
    assert str(from_status(status_pb2.Status(code=code_pb2.DATA_LOSS))) == "DATA_LOSS"


def test_anything_else_is_internal_and_an_ok_status_is_no_error():
    assert to_status(KeyError("k")).code == code_pb2.INTERNAL
    assert to_status(KeyError("k"), "internal error (id 1)").message == "internal error (id 1)"
    with pytest.raises(ValueError, match="OK status"):
        from_status(status_pb2.Status(code=code_pb2.OK))


def test_blob_subjects_parse_back_and_anything_else_is_refused():
    assert blob_subject(D) == f"blobs/{D.hash}/{D.size_bytes}"
    assert parse_blob_subject(blob_subject(D)) == D
    for bad in ["working_directory", f"blobs/{D.hash}", f"blobs/{D.hash}/-1", f"cas/{D.hash}/6"]:
        with pytest.raises(errors.InvalidArgument, match="does not name a blob"):
            parse_blob_subject(bad)


def test_the_status_trailer_yields_its_details_and_a_malformed_one_is_skipped():
    status = to_status(FailedPrecondition("missing", [missing_blob(D)]))
    trailer = (("grpc-status-details-bin", status.SerializeToString()),)
    assert list(trailer_details(trailer)) == list(status.details)
    assert trailer_details((("grpc-status-details-bin", b"\xff\xff"),)) == []
    assert trailer_details(None) == []
