"""Client-supplied text in messages and log lines: quoted, and shortened when long.

A hostile client can send megabyte names; echoing them whole made 2 MB log lines.
"""

from __future__ import annotations

from expbuild.errors import InvalidArgument

MAX_QUOTED_CHARS = 200


def shorten(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text` itself when short enough, else its first `limit` characters and the length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def quoted(value: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """repr() of a client-supplied string, shortened to about `limit` characters."""
    return shorten(repr(value), limit)


def check_no_nul(value: str, what: str) -> str:
    """PostgreSQL text cannot hold NUL: refuse it here, with the field's name."""
    if "\x00" in value:
        raise InvalidArgument(f"{what} {quoted(value)} contains a NUL character")
    return value
