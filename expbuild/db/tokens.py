"""Bearer tokens in the `tokens` table: create, find by secret, list, revoke.

Secrets are generated and hashed in `expbuild.auth.token_secrets`; this module sees only hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from expbuild.db.pool import Database
from expbuild.db.queries import sql
from expbuild.errors import AlreadyExists, NotFound


@dataclass(frozen=True)
class TokenRecord:
    name: str
    scopes: tuple[str, ...]
    instances: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    secret_sha256: bytes = b""


def _record(row) -> TokenRecord:
    return TokenRecord(
        name=row["name"],
        scopes=tuple(row["scopes"]),
        instances=tuple(row["instances"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
        secret_sha256=bytes(row["secret_sha256"]) if "secret_sha256" in row else b"",
    )


async def create_token(
    db: Database,
    *,
    name: str,
    secret_sha256: bytes,
    scopes: list[str],
    instances: list[str],
    expires_at: datetime | None,
) -> TokenRecord:
    row = await db.fetchrow(sql("create_token"), name, secret_sha256, scopes, instances, expires_at)
    if row is None:
        raise AlreadyExists(f"a token named {name!r} exists already; pick another name")
    return _record(row)


async def find_token(db: Database, secret_sha256: bytes) -> TokenRecord | None:
    row = await db.fetchrow(sql("find_token"), secret_sha256)
    return None if row is None else _record(row)


async def list_tokens(db: Database) -> list[TokenRecord]:
    return [_record(r) for r in await db.fetch(sql("list_tokens"))]


async def revoke_token(db: Database, name: str) -> datetime:
    row = await db.fetchrow(sql("revoke_token"), name)
    if row is None:
        raise NotFound(f"no token named {name!r}; see `expbuild tokens list`")
    return row["revoked_at"]
