"""Remote Asset API storage: URIs (with qualifiers) -> CAS digests, and the fetch record."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from expbuild.db.pool import Database
from expbuild.db.queries import sql
from expbuild.digest import Digest


@dataclass(frozen=True)
class KnownAsset:
    uri: str
    digest: Digest
    expires_at: datetime | None


@dataclass(frozen=True)
class FetchRecord:
    """One row of `asset_fetches`: who asked for which URIs and what answered."""

    instance_name: str
    kind: str
    uris: list[str]
    qualifiers: dict[str, str]
    outcome: str  # cached | downloaded | failed
    requested_by: str
    uri: str | None = None
    digest: Digest | None = None
    bytes_downloaded: int | None = None
    tool: str | None = None
    tool_invocation_id: str | None = None
    error: str | None = None


async def find_assets(
    db: Database,
    instance_name: str,
    kind: str,
    uris: list[str],
    qualifiers: dict[str, str],
    checksum_sri: str | None,
    oldest: datetime | None,
) -> list[KnownAsset]:
    """Candidates, best first: exact (URI, qualifiers) matches, then same-checksum ones."""
    rows = await db.fetch(
        sql("find_asset"), instance_name, kind, uris, qualifiers, checksum_sri, oldest
    )
    return [KnownAsset(r["uri"], Digest.parse(r["digest"]), r["expires_at"]) for r in rows]


async def put_assets(
    db: Database,
    instance_name: str,
    kind: str,
    uris: list[str],
    qualifiers: dict[str, str],
    digest: Digest,
    origin: str,
    expires_at: datetime | None,
) -> None:
    await db.execute(
        sql("put_assets"),
        instance_name,
        kind,
        uris,
        qualifiers,
        str(digest),
        origin,
        expires_at,
    )


async def forget_asset(db: Database, instance_name: str, kind: str, digest: Digest) -> None:
    await db.execute(sql("forget_asset"), instance_name, kind, str(digest))


async def record_fetch(db: Database, record: FetchRecord) -> None:
    await db.execute(
        sql("record_fetch"),
        record.instance_name,
        record.kind,
        record.uris,
        record.qualifiers,
        record.outcome,
        record.uri,
        None if record.digest is None else str(record.digest),
        record.bytes_downloaded,
        record.requested_by,
        record.tool,
        record.tool_invocation_id,
        record.error,
    )


async def purge_asset_fetches(db: Database, retention: timedelta, batch_size: int = 5000) -> int:
    """Delete up to `batch_size` fetch records older than `retention`; returns how many."""
    return len(await db.fetch(sql("purge_asset_fetches"), retention, batch_size))
