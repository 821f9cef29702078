"""The action cache: serialized ActionResults by (instance name, action digest)."""

from __future__ import annotations

from expbuild.db.pool import Database
from expbuild.db.queries import sql
from expbuild.digest import Digest


async def get_action_result(
    db: Database, instance_name: str, action_digest: Digest
) -> bytes | None:
    return await db.fetchval(sql("get_action_result"), instance_name, str(action_digest))


async def put_action_result(
    db: Database, instance_name: str, action_digest: Digest, result: bytes
) -> None:
    await db.execute(sql("put_action_result"), instance_name, str(action_digest), result)
