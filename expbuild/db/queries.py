"""Named SQL queries loaded from `expbuild/sql/*.sql`.

A file holds blocks that start with `-- name: <query_name>`; the block runs until the next
such line. Comments stay in the text (Postgres ignores them) so `pg_stat_statements` shows
the same statement a reader finds in the file.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def parse(text: str, origin: str) -> dict[str, str]:
    found: dict[str, str] = {}
    matches = list(_NAME.finditer(text))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        name = match.group(1)
        if name in found:
            raise ValueError(f"{origin}: query {name!r} is defined twice")
        body = text[match.end() : end].strip()
        found[name] = body.rstrip().removesuffix(";")
    return found


@cache
def all_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        for name, body in parse(path.read_text(), path.name).items():
            if name in queries:
                raise ValueError(f"{path.name}: query {name!r} is also defined in another file")
            queries[name] = body
    return queries


def sql(name: str) -> str:
    """The text of the named query; KeyError names the missing query."""
    try:
        return all_queries()[name]
    except KeyError:
        raise KeyError(f"no SQL query named {name!r} in {SQL_DIR}") from None
