"""Platforms: an action's requirements as {name: [values]}, and whether any worker offers them."""

from __future__ import annotations

import json

import asyncpg

from expbuild.db import workers
from expbuild.db.queue import PlatformSpec
from expbuild.errors import FailedPrecondition, InvalidArgument, Violation
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.os_family import with_lexicon_os_family
from expbuild.text import check_no_nul, quoted


def platform_spec(platform: re_pb2.Platform, where: str = "platform") -> PlatformSpec:
    """REAPI Platform properties -> {name: [values]}; a name may appear with several values.

    OSFamily values are read in the platform lexicon's spelling (`Linux` -> `linux`), so
    that a Bazel platform saying `Linux` and a worker offering `linux` match.
    """
    spec: PlatformSpec = {}
    for prop in platform.properties:
        if not prop.name.strip():
            raise InvalidArgument(
                f"{where}: a property has an empty name (value {quoted(prop.value)})"
            )
        check_no_nul(prop.name, f"{where}: property name")
        check_no_nul(prop.value, f"{where}: property {quoted(prop.name)} value")
        spec.setdefault(prop.name, []).append(prop.value)
    return with_lexicon_os_family(spec)


async def check_platform_offered(pool: asyncpg.Pool, platform: PlatformSpec) -> None:
    """FAILED_PRECONDITION when workers are online and none offers `platform` (queueing
    it would wait for a worker that may never come)."""
    offered, any_online, offers = await workers.platform_offer(pool, platform)
    if offered or not any_online:
        return
    raise FailedPrecondition(
        f"no online worker offers platform {json.dumps(platform, sort_keys=True)}; "
        f"workers offer {json.dumps(offers, sort_keys=True)} "
        "(start a worker with matching [worker.platform], or set "
        "[server] reject_unmatched_platforms = false to queue it anyway)",
        [Violation("UNSATISFIABLE_PLATFORM", "platform", json.dumps(platform, sort_keys=True))],
    )
