"""The action cache as clients see it: only entries whose every blob is still in the CAS.

A cached ActionResult is only useful if every blob it names can still be read (Bazel
builds on top of a hit without checking), so an entry with a blob gone counts as a miss
and the action runs again. Writes from clients are checked the same way.
"""

from __future__ import annotations

import logging

import asyncpg

from expbuild.cas.action_results import missing_blobs
from expbuild.cas.store import FileStore
from expbuild.db import action_cache
from expbuild.digest import Digest, digest_field, digest_of
from expbuild.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.status import missing_blob

log = logging.getLogger(__name__)


async def lookup_cached_result(
    pool: asyncpg.Pool, store: FileStore, instance: str, digest: Digest
) -> re_pb2.ActionResult | None:
    """The cached result of the action, or None when there is none or a blob it names
    has left the CAS."""
    raw = await action_cache.get_action_result(pool, instance, digest)
    if raw is None:
        return None
    result = re_pb2.ActionResult.FromString(raw)
    missing = await missing_blobs(store, result)
    if missing:
        log.info(
            "Action cache entry for %s is incomplete (%d blob(s) gone); treating as a miss",
            digest,
            len(missing),
        )
        return None
    return result


def check_result_digests(result: re_pb2.ActionResult) -> None:
    """INVALID_ARGUMENT naming the first malformed digest of the ActionResult."""
    for field in ("stdout_digest", "stderr_digest"):
        if result.HasField(field):
            digest_field(getattr(result, field), f"action_result.{field}")
    for index, output in enumerate(result.output_files):
        digest_field(output.digest, f"action_result.output_files[{index}].digest")
    for index, directory in enumerate(result.output_directories):
        where = f"action_result.output_directories[{index}]"
        # REAPI 2.3: a DIRECTORY_ONLY result (BuildStream's) names no Tree, only the root.
        if directory.HasField("root_directory_digest"):
            digest_field(directory.root_directory_digest, f"{where}.root_directory_digest")
        if directory.HasField("tree_digest") or not directory.HasField("root_directory_digest"):
            digest_field(directory.tree_digest, f"{where}.tree_digest")
    check_inlined_bytes(result)


def check_inlined_bytes(result: re_pb2.ActionResult) -> None:
    """INVALID_ARGUMENT when bytes inlined in the result are not the blob its digest names:
    a reader trusts the inlined copy without fetching the blob, so a mismatch would serve
    other bytes than the CAS holds under that digest."""
    inlined = [
        ("stdout_raw", result.stdout_raw, result, "stdout_digest"),
        ("stderr_raw", result.stderr_raw, result, "stderr_digest"),
    ] + [
        (f"output_files[{index}].contents", output.contents, output, "digest")
        for index, output in enumerate(result.output_files)
    ]
    for name, data, message, field in inlined:
        if not data or not message.HasField(field):
            continue
        named = Digest.from_proto(getattr(message, field))
        if digest_of(data) != named:
            raise InvalidArgument(
                f"action_result.{name}: the inlined bytes are not the blob {named} "
                "that its digest names"
            )


async def store_client_result(
    pool: asyncpg.Pool,
    store: FileStore,
    instance: str,
    digest: Digest,
    result: re_pb2.ActionResult,
    *,
    updates_allowed: bool,
) -> None:
    """Store a result a client computed itself (UpdateActionResult), once every blob it
    names is in the CAS."""
    if not updates_allowed:
        raise PermissionDenied(
            "this server does not accept action results from clients "
            "([server] allow_action_cache_updates = false)"
        )
    check_result_digests(result)
    missing = await missing_blobs(store, result)
    if missing:
        raise FailedPrecondition(
            f"the action result names {len(missing)} blob(s) that are not in the CAS; "
            "upload the outputs first",
            [missing_blob(d) for d in missing],
        )
    await action_cache.put_action_result(pool, instance, digest, result.SerializeToString())
