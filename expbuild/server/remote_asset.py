"""Remote Asset API (build.bazel.remote.asset.v1): Fetch and Push over `AssetCatalog`.

A request that is malformed (no URI, an unsupported qualifier, a bad digest) is the call's
INVALID_ARGUMENT; a fetch that finds no content (HTTP error, checksum mismatch, too large,
too slow) is an OK call whose response `status` says why, as the API asks.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit

import grpc
from google.protobuf import timestamp_pb2

from expbuild.assets.catalog import BLOB, DIRECTORY, AssetCatalog, Caller, FetchRequest
from expbuild.assets.qualifiers import Qualifiers, check_asset_key, parse_qualifiers
from expbuild.auth.principal import current_principal
from expbuild.auth.scopes import CAS_WRITE
from expbuild.digest import check_digest_function, digest_field
from expbuild.errors import ExpBuildError, InvalidArgument
from expbuild.proto import remote_asset_pb2 as ra_pb2
from expbuild.proto import remote_asset_pb2_grpc as ra_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.request_metadata import request_metadata_of
from expbuild.reapi.status import ok_status
from expbuild.scheduling.actions import checked_duration
from expbuild.server.instances import InstanceNames
from expbuild.server.status import client_status, rpc
from expbuild.text import check_no_nul, quoted


def _uris(request) -> list[str]:
    if not request.uris:
        raise InvalidArgument("uris is empty; name at least one URI")
    return [check_no_nul(uri, f"uris[{i}]") for i, uri in enumerate(request.uris)]


def _absolute(uris: list[str]) -> list[str]:
    """A pushed URI is only ever matched, never fetched: refuse one that names nothing."""
    for i, uri in enumerate(uris):
        if not urlsplit(uri).scheme:
            raise InvalidArgument(f"uris[{i}] {quoted(uri)} is not an absolute URI (no scheme)")
    return uris


def _qualifiers(request, uris: list[str]) -> Qualifiers:
    qualifiers = parse_qualifiers([(q.name, q.value) for q in request.qualifiers])
    check_asset_key(request.instance_name, uris, qualifiers)
    return qualifiers


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
        uris = _uris(request)
        return FetchRequest(
            instance_name=request.instance_name,
            kind=kind,
            uris=uris,
            qualifiers=_qualifiers(request, uris),
            timeout=timeout or None,
            oldest_content_accepted=_timestamp(request, "oldest_content_accepted"),
        )

    async def _fetch(self, request, context, kind: str, reply_type, digest_name: str):
        """Answer a FetchBlob or FetchDirectory: content found or why not, in `status`."""
        fetch = self._request(request, kind)
        try:
            got = await self._catalog.fetch(fetch, caller_of(context))
        except ExpBuildError as exc:
            return reply_type(status=client_status(exc, f"Fetch{kind.capitalize()}"))
        return reply_type(
            status=ok_status(),
            uri=got.uri,
            qualifiers=request.qualifiers,
            expires_at=_to_timestamp(got.expires_at),
            digest_function=re_pb2.DigestFunction.SHA256,
            **{digest_name: got.digest.to_proto()},
        )

    @rpc
    async def FetchBlob(self, request, context):
        return await self._fetch(request, context, BLOB, ra_pb2.FetchBlobResponse, "blob_digest")

    @rpc
    async def FetchDirectory(self, request, context):
        return await self._fetch(
            request, context, DIRECTORY, ra_pb2.FetchDirectoryResponse, "root_directory_digest"
        )


class PushServicer(ra_grpc.PushServicer):
    def __init__(self, catalog: AssetCatalog, instances: InstanceNames) -> None:
        self._catalog = catalog
        self._instances = instances

    async def _push(self, request, kind: str, digest_name: str) -> None:
        self._instances.check(request.instance_name)
        check_digest_function(request.digest_function)
        uris = _absolute(_uris(request))
        qualifiers = _qualifiers(request, uris)
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
