"""Whether any online worker offers an action's platform, and each replica's short memory
of the yes answers (`PlatformOffers`); the conversions live in `expbuild.reapi.platforms`."""

from __future__ import annotations

import json
import time

import asyncpg

from expbuild.db import workers
from expbuild.errors import FailedPrecondition, Violation
from expbuild.reapi.platforms import PlatformSpec, normalize_platform

OFFER_TTL = 2.0
"""Seconds one replica reuses "some online worker offers this platform"."""
_MAX_REMEMBERED = 1024


class PlatformOffers:
    """One replica's memory of the platforms online workers offer, so that Execute's fast
    path asks the database once per platform every `OFFER_TTL`, not once per action.

    Only a yes is remembered. A no is asked again every time, so a worker that has just
    registered is never refused; a worker that has just gone away may still see its
    platform's actions queued for up to `ttl` — as if it had left a moment after they
    were. Platforms come from clients, so at most `_MAX_REMEMBERED` are kept.
    """

    def __init__(self, ttl: float = OFFER_TTL) -> None:
        self.ttl = ttl
        self._offered_until: dict[str, float] = {}

    def remembers(self, platform: PlatformSpec) -> bool:
        return self._offered_until.get(_key(platform), 0.0) > time.monotonic()

    async def check(self, pool: asyncpg.Pool, platform: PlatformSpec) -> None:
        """`check_platform_offered`, answered from memory while a yes is fresh."""
        key = _key(platform)
        now = time.monotonic()
        if self._offered_until.get(key, 0.0) > now:
            return
        if await check_platform_offered(pool, platform):
            if len(self._offered_until) >= _MAX_REMEMBERED:
                self._offered_until = {k: t for k, t in self._offered_until.items() if t > now}
                if len(self._offered_until) >= _MAX_REMEMBERED:
                    self._offered_until.clear()
            self._offered_until[key] = now + self.ttl


def _key(platform: PlatformSpec) -> str:
    return json.dumps(normalize_platform(platform), sort_keys=True)


async def check_platform_offered(pool: asyncpg.Pool, platform: PlatformSpec) -> bool:
    """FAILED_PRECONDITION when workers are online and none offers `platform` (queueing
    it would wait for a worker that may never come). True when a worker offers it, False
    when none is online to judge."""
    offered, any_online, offers = await workers.platform_offer(pool, platform)
    if offered or not any_online:
        return offered
    raise FailedPrecondition(
        f"no online worker offers platform {json.dumps(platform, sort_keys=True)}; "
        f"workers offer {json.dumps(offers, sort_keys=True)} "
        "(start a worker with matching [worker.platform], or set "
        "[server] reject_unmatched_platforms = false to queue it anyway)",
        [Violation("UNSATISFIABLE_PLATFORM", "platform", json.dumps(platform, sort_keys=True))],
    )
