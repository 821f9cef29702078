"""Checking a bearer token: hash lookup, constant-time compare, a short per-replica cache.

The cache keeps what a replica read about a token for `[auth] cache_ttl` (a few seconds):
a revocation or expiry is seen within that time without a query at every call.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from expbuild.auth.principal import Principal
from expbuild.auth.token_secrets import secret_hash
from expbuild.db import tokens as db_tokens
from expbuild.db.tokens import TokenRecord

_MAX_CACHED = 10_000
_ASK = "ask an operator for a token (`expbuild tokens create`)"


class Unauthenticated(Exception):
    """The caller presented no credential, or one that is not (or no longer) valid."""


class TokenVerifier:
    def __init__(
        self,
        pool: asyncpg.Pool,
        cache_ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.pool = pool
        self.cache_ttl = cache_ttl
        self.clock = clock
        self._cache: dict[bytes, tuple[float, TokenRecord | None]] = {}
        self._static: dict[bytes, Principal] = {}

    def add_static(self, secret: str, principal: Principal) -> None:
        """Accept `secret` as `principal` without the database (the server's in-process
        workers; the secret lives only in this process's memory and a private file)."""
        self._static[secret_hash(secret)] = principal

    async def _record(self, digest: bytes) -> TokenRecord | None:
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        record = await db_tokens.find_token(self.pool, digest)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()  # a flood of made-up tokens must not grow memory
        self._cache[digest] = (now + self.cache_ttl, record)
        return record

    async def verify(self, secret: str) -> Principal:
        digest = secret_hash(secret)
        if digest in self._static:
            return self._static[digest]
        record = await self._record(digest)
        if record is None or not hmac.compare_digest(record.secret_sha256, digest):
            raise Unauthenticated(f"the bearer token is not known to this server; {_ASK}")
        if record.revoked_at is not None:
            raise Unauthenticated(
                f"token {record.name!r} was revoked at {record.revoked_at:%Y-%m-%d %H:%M:%S}"
                f" UTC; {_ASK}"
            )
        if record.expires_at is not None and record.expires_at <= datetime.now(UTC):
            raise Unauthenticated(
                f"token {record.name!r} expired at {record.expires_at:%Y-%m-%d %H:%M:%S} UTC; {_ASK}"
            )
        return Principal.of(record.name, record.scopes, record.instances)
