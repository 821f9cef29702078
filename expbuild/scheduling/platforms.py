"""Whether any online worker offers an action's platform (the conversions live in
`expbuild.reapi.platforms`)."""

from __future__ import annotations

import json

import asyncpg

from expbuild.db import workers
from expbuild.errors import FailedPrecondition, Violation
from expbuild.reapi.platforms import PlatformSpec


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
