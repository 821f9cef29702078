"""Remote Asset API (build.bazel.remote.asset.v1): Fetch and Push over `AssetCatalog`.

A request that is malformed (no URI, an unsupported qualifier, a bad digest) is the call's
INVALID_ARGUMENT; a fetch that finds no content (HTTP error, checksum mismatch, too large,
too slow) is an OK call whose response `status` says why, as the API asks.
"""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2

from expbuild.assets.catalog import BLOB, DIRECTORY, AssetCatalog, Caller, FetchRequest
from expbuild.assets.qualifiers import Qualifiers, parse_qualifiers
from expbuild.auth.principal import current_principal
from expbuild.auth.scopes import CAS_WRITE
from expbuild.digest import check_digest_function, digest_field
from expbuild.errors import ExpBuildError, InvalidArgument
from expbuild.proto import remote_asset_pb2 as ra_pb2
from expbuild.proto import remote_asset_pb2_grpc as ra_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.request_metadata import request_metadata_of
from expbuild.reapi.status import ok_status, to_status
from expbuild.scheduling.actions import checked_duration
from expbuild.server.instances import InstanceNames
from expbuild.server.status import rpc
from expbuild.text import check_no_nul


def _uris(request) -> list[str]:
    if not request.uris:
        raise InvalidArgument("uris is empty; name at least one URI")
    return [check_no_nul(uri, f"uris[{i}]") for i, uri in enumerate(request.uris)]


def _qualifiers(request) -> Qualifiers:
    return parse_qualifiers([(q.name, q.value) for q in request.qualifiers])


def _timestamp(request, field: str) -> datetime | None:
    if not request.HasField(field):
        return None
    try:
        return getattr(request, field).ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(f"{field} is not a valid Timestamp") from None


def _to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    """Who is asking (the credential's name, or the peer address with auth off), the
    RequestMetadata's tool if sent, and whether it may make the server download."""
    tool = invocation = None
    try:
        metadata = request_metadata_of(context.invocation_metadata())
    except InvalidArgument:
        metadata = None  # a fetch only records the tool: a bad header loses that detail
    if metadata is not None:
        tool = f"{metadata.tool_name} {metadata.tool_version}".strip() or None
        invocation = metadata.tool_invocation_id or None
    principal = current_principal()
    name = principal.name if principal.authenticated else (context.peer() or "unknown")
    return Caller(
        name=name,
        tool=tool,
        tool_invocation_id=invocation,
        may_download=CAS_WRITE in principal.scopes,
    )


class FetchServicer(ra_grpc.FetchServicer):
    def __init__(self, catalog: AssetCatalog, instances: InstanceNames) -> None:
        self._catalog = catalog
        self._instances = instances

    def _request(self, request, kind: str) -> FetchRequest:
        self._instances.check(request.instance_name)
        check_digest_function(request.digest_function)
        timeout = None
        if request.HasField("timeout"):
            timeout = checked_duration(request.timeout, "timeout")
            if timeout.total_seconds() < 0:
                raise InvalidArgument("timeout is negative")
        return FetchRequest(
            instance_name=request.instance_name,
            kind=kind,
            uris=_uris(request),
            qualifiers=_qualifiers(request),
            timeout=timeout or None,
            oldest_content_accepted=_timestamp(request, "oldest_content_accepted"),
        )

    @rpc
    async def FetchBlob(self, request, context):
        fetch = self._request(request, BLOB)
        try:
            got = await self._catalog.fetch(fetch, caller_of(context))
        except ExpBuildError as exc:
            return ra_pb2.FetchBlobResponse(status=to_status(exc))
        return ra_pb2.FetchBlobResponse(
            status=ok_status(),
            uri=got.uri,
            qualifiers=request.qualifiers,
            expires_at=_to_timestamp(got.expires_at),
            blob_digest=got.digest.to_proto(),
            digest_function=re_pb2.DigestFunction.SHA256,
        )

    @rpc
    async def FetchDirectory(self, request, context):
        fetch = self._request(request, DIRECTORY)
        try:
            got = await self._catalog.fetch(fetch, caller_of(context))
        except ExpBuildError as exc:
            return ra_pb2.FetchDirectoryResponse(status=to_status(exc))
        return ra_pb2.FetchDirectoryResponse(
            status=ok_status(),
            uri=got.uri,
            qualifiers=request.qualifiers,
            expires_at=_to_timestamp(got.expires_at),
            root_directory_digest=got.digest.to_proto(),
            digest_function=re_pb2.DigestFunction.SHA256,
        )


class PushServicer(ra_grpc.PushServicer):
    def __init__(self, catalog: AssetCatalog, instances: InstanceNames) -> None:
        self._catalog = catalog
        self._instances = instances

    async def _push(self, request, kind: str, digest_name: str) -> None:
        self._instances.check(request.instance_name)
        check_digest_function(request.digest_function)
        uris = _uris(request)
        qualifiers = _qualifiers(request)
        digest = digest_field(getattr(request, digest_name), digest_name)
        for field in ("references_blobs", "references_directories"):
            for i, reference in enumerate(getattr(request, field)):
                digest_field(reference, f"{field}[{i}]")
        await self._catalog.push(
            request.instance_name,
            kind,
            uris,
            qualifiers,
            digest,
            _timestamp(request, "expire_at"),
        )

    @rpc
    async def PushBlob(self, request, context):
        await self._push(request, BLOB, "blob_digest")
        return ra_pb2.PushBlobResponse()

    @rpc
    async def PushDirectory(self, request, context):
        await self._push(request, DIRECTORY, "root_directory_digest")
        return ra_pb2.PushDirectoryResponse()
