"""Fetch and Push of the Remote Asset API, below the servicer.

An asset is (URI, qualifiers) -> content in the CAS. Push records the mapping for content
already stored; Fetch answers from a known mapping whose content is still in the CAS
(exact URI and qualifiers, or any content with the requested `checksum.sri`), and
otherwise downloads the blob (`download.py`) and records the mapping. Every Fetch is
written to `asset_fetches`: who asked, for which URIs, and what answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from google.protobuf.message import DecodeError

from expbuild.assets.download import download
from expbuild.assets.qualifiers import Qualifiers
from expbuild.cas.layout import read_file_chunks
from expbuild.cas.store import FileStore
from expbuild.config import AssetSettings
from expbuild.db import assets as db_assets
from expbuild.db.pool import Database
from expbuild.digest import Digest
from expbuild.errors import (
    ExpBuildError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violation,
)
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.text import shorten

log = logging.getLogger(__name__)

BLOB = "blob"
DIRECTORY = "directory"


@dataclass(frozen=True)
class Caller:
    """Who is fetching: recorded with each fetch."""

    name: str
    tool: str | None = None
    tool_invocation_id: str | None = None
    # Whether this caller may make the server download (it adds to the CAS for everyone and
    # opens an outgoing connection): with auth on, the `cas:write` scope.
    may_download: bool = True


@dataclass(frozen=True)
class FetchRequest:
    instance_name: str
    kind: str
    uris: list[str]
    qualifiers: Qualifiers
    timeout: timedelta | None = None
    oldest_content_accepted: datetime | None = None


@dataclass(frozen=True)
class Fetched:
    uri: str
    digest: Digest
    expires_at: datetime | None
    downloaded: bool


class AssetCatalog:
    def __init__(self, db: Database, store: FileStore, settings: AssetSettings) -> None:
        self._db = db
        self._store = store
        self._settings = settings

    async def fetch(self, request: FetchRequest, caller: Caller) -> Fetched:
        """The content for the request; raises an ExpBuildError saying why there is none.

        Both outcomes are recorded in `asset_fetches`."""
        record = db_assets.FetchRecord(
            instance_name=request.instance_name,
            kind=request.kind,
            uris=request.uris,
            qualifiers=request.qualifiers.key,
            outcome="failed",
            requested_by=caller.name,
            tool=caller.tool,
            tool_invocation_id=caller.tool_invocation_id,
        )
        try:
            fetched = await self._known(request)
            if fetched is None:
                if not caller.may_download:
                    raise PermissionDenied(
                        f"{caller.name} may read known assets but not make the server "
                        "download new ones (that needs the cas:write scope)"
                    )
                fetched = await self._download(request)
        except ExpBuildError as exc:
            await db_assets.record_fetch(self._db, replace(record, error=shorten(str(exc), 2000)))
            raise
        outcome = "downloaded" if fetched.downloaded else "cached"
        await db_assets.record_fetch(
            self._db,
            replace(
                record,
                outcome=outcome,
                uri=fetched.uri,
                digest=fetched.digest,
                bytes_downloaded=fetched.digest.size_bytes if fetched.downloaded else None,
            ),
        )
        log.info(
            "Asset %s %s for %s: %s (%s)",
            request.kind,
            outcome,
            caller.name,
            shorten(fetched.uri),
            fetched.digest,
        )
        return fetched

    async def _known(self, request: FetchRequest) -> Fetched | None:
        candidates = await db_assets.find_assets(
            self._db,
            request.instance_name,
            request.kind,
            request.uris,
            request.qualifiers.key,
            # A checksum names a blob's bytes; a directory pushed under one is not checked
            # against it, so it answers only its own URIs.
            request.qualifiers.checksum_sri if request.kind == BLOB else None,
            request.oldest_content_accepted,
        )
        for asset in candidates:
            if await self._store.has(asset.digest):
                return Fetched(asset.uri, asset.digest, asset.expires_at, downloaded=False)
            # Evicted since: this mapping can answer nothing until fetched or pushed again.
            await db_assets.forget_asset(
                self._db, request.instance_name, request.kind, asset.digest
            )
        return None

    async def _download(self, request: FetchRequest) -> Fetched:
        if request.kind != BLOB:
            raise NotFound(
                "no directory is known for these URIs and qualifiers; this server downloads "
                "blobs only (FetchBlob), a directory must be pushed first (PushDirectory)"
            )
        limit = self._settings.download_timeout
        timeout = min(request.timeout, limit) if request.timeout else limit
        deadline = time.monotonic() + timeout.total_seconds()
        errors: list[ExpBuildError] = []
        for uri in request.uris:
            try:
                got = await asyncio.to_thread(
                    download,
                    self._store,
                    uri,
                    request.qualifiers,
                    self._settings.max_download_size,
                    deadline,
                )
            except ExpBuildError as exc:
                errors.append(exc)
                continue
            await db_assets.put_assets(
                self._db,
                request.instance_name,
                BLOB,
                [got.uri],
                request.qualifiers.key,
                got.digest,
                "fetch",
                None,
            )
            return Fetched(got.uri, got.digest, None, downloaded=True)
        # The last URI's kind of failure, with every URI's reason.
        error = errors[-1]
        if len(errors) > 1:
            error = type(error)("; ".join(str(e) for e in errors))
        raise error

    async def push(
        self,
        instance_name: str,
        kind: str,
        uris: list[str],
        qualifiers: Qualifiers,
        digest: Digest,
        expires_at: datetime | None,
    ) -> None:
        """Record that `uris` with `qualifiers` name `digest`, which must be in the CAS."""
        if not await self._store.has(digest):
            raise FailedPrecondition(
                f"the pushed {kind} {digest} is not in the CAS; upload it first",
                [Violation("MISSING", f"blobs/{digest}")],
            )
        if kind == DIRECTORY:
            await asyncio.to_thread(_check_directory, self._store, digest)
        if kind == BLOB and qualifiers.checksums:
            # Pushed under a checksum, the blob answers every fetch with that checksum:
            # it must really have it.
            mismatch = await asyncio.to_thread(_checksum_mismatch, self._store, digest, qualifiers)
            if mismatch:
                raise InvalidArgument(f"the pushed blob {digest} does not match: {mismatch}")
        await db_assets.put_assets(
            self._db, instance_name, kind, uris, qualifiers.key, digest, "push", expires_at
        )


# Past this a root "Directory" is taken to be something else; workers refuse larger
# Directory messages by default too ([worker.backend] max_directory_size).
MAX_PUSHED_DIRECTORY_BYTES = 16 * 1024 * 1024


def _check_directory(store: FileStore, digest: Digest) -> None:
    """INVALID_ARGUMENT unless the stored blob is a Directory message: a pushed directory
    answers FetchDirectory, whose callers take it for the root of a tree."""
    if digest.size_bytes > MAX_PUSHED_DIRECTORY_BYTES:
        raise InvalidArgument(
            f"the pushed root_directory_digest {digest} is over "
            f"{MAX_PUSHED_DIRECTORY_BYTES} bytes, too large for a Directory message"
        )
    data = store.layout.path_of(digest).read_bytes() if not digest.is_empty else b""
    try:
        re_pb2.Directory.FromString(data)
    except DecodeError:
        raise InvalidArgument(
            f"the pushed root_directory_digest {digest} is not a Directory message"
        ) from None


def _checksum_mismatch(store: FileStore, digest: Digest, qualifiers: Qualifiers) -> str | None:
    hashers = qualifiers.hashers()
    if digest.is_empty:
        return qualifiers.mismatch(hashers)  # no file backs the empty blob
    with open(store.path_of(digest), "rb") as f:
        for chunk in read_file_chunks(f):
            for hasher in hashers.values():
                hasher.update(chunk)
    return qualifiers.mismatch(hashers)
