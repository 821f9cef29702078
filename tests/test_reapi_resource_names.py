"""ByteStream resource names: what the client builds, the server parses back."""

from __future__ import annotations

import pytest

from expbuild.digest import digest_of
from expbuild.errors import InvalidArgument
from expbuild.reapi.resource_names import (
    BlobResource,
    parse_read_name,
    parse_upload_name,
    read_name,
    upload_name,
)

D = digest_of(b"some blob")
H = D.hash


@pytest.mark.parametrize("instance", ["", "main", "a/b/c"])
@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_built_names_parse_back(instance, compressor):
    assert parse_read_name(read_name(instance, D, compressor)) == BlobResource(
        instance, D, compressor
    )
    name = upload_name(instance, D, compressor, upload_id="u-1")
    assert parse_upload_name(name) == BlobResource(instance, D, compressor, "u-1")
    # Each call without an id names a new upload.
    assert upload_name(instance, D, compressor) != upload_name(instance, D, compressor)


def test_accepted_spellings():
    assert parse_read_name(f"blobs/sha256/{H}/{D.size_bytes}").digest == D
    assert parse_upload_name(f"x/uploads/u/blobs/{H}/{D.size_bytes}/extra/path").digest == D
    # "identity" and "" mean uncompressed when building.
    assert read_name("", D, "identity") == f"blobs/{H}/{D.size_bytes}"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (f"{H}/9", "is not of the form"),
        (f"blobs/{H}", "is not of the form"),
        (f"blobs/{H}/9/extra", "is not of the form"),
        (f"blobs/{H}/-1", "is not a non-negative integer"),
        (f"blobs/{H}/nine", "is not a non-negative integer"),
        (f"blobs/{H[:10]}/9", "resource name"),
        (f"compressed-blobs/gzip/{H}/9", "'gzip' is not supported"),
        (f"compressed-blobs/identity/{H}/9", "use blobs/"),
        (f"blobs/md5/{H}/9", "digest function 'md5' is not supported"),
        (f"uploads/u/blobs/{H}/9", "is an upload name"),
    ],
)
def test_bad_read_names_say_what_is_wrong(name, problem):
    with pytest.raises(InvalidArgument, match=problem):
        parse_read_name(name)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (f"blobs/{H}/9", "is not of the form"),
        (f"uploads/u/{H}/9", "is not of the form"),
        (f"uploads//blobs/{H}/9", "empty uuid"),
        (f"uploads/u/compressed-blobs/brotli/{H}/9", "'brotli' is not supported"),
    ],
)
def test_bad_upload_names_say_what_is_wrong(name, problem):
    with pytest.raises(InvalidArgument, match=problem):
        parse_upload_name(name)


def test_building_refuses_an_unknown_compressor():
    with pytest.raises(InvalidArgument, match="'gzip' is not supported"):
        read_name("", D, "gzip")
