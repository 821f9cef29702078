"""Token secrets: generated here, stored only as their SHA-256."""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "ebt_"  # recognisable in a leaked log or a secret scanner


def new_secret() -> str:
    """256 random bits, URL-safe, behind the `ebt_` prefix."""
    return PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
