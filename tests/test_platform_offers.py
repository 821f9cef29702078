"""Execute's platform check, remembered per replica (scheduling/platforms.py PlatformOffers)."""

from __future__ import annotations

import pytest

from expbuild.db import workers
from expbuild.errors import FailedPrecondition
from expbuild.scheduling.platforms import PlatformOffers

LINUX = {"OSFamily": ["Linux"]}
DARWIN = {"OSFamily": ["Darwin"]}


async def register(pool, name: str, platform: dict) -> str:
    return await workers.register_worker(
        pool, worker_id="", name=name, hostname="h", platform=platform, max_concurrent=1
    )


async def test_a_yes_is_reused_without_asking_the_database(pool):
    linux = await register(pool, "linux", LINUX)
    await register(pool, "mac", DARWIN)
    offers = PlatformOffers(ttl=3600)
    await offers.check(pool, LINUX)
    assert offers.remembers(LINUX)
    # The database now says no Linux worker is online; the replica's yes still stands.
    await pool.execute("UPDATE workers SET state = 'offline' WHERE id = $1", linux)
    await offers.check(pool, LINUX)
    # A replica without that memory asks, and is told what the workers do offer.
    with pytest.raises(FailedPrecondition, match="Darwin"):
        await PlatformOffers(ttl=3600).check(pool, LINUX)


async def test_a_yes_expires_after_its_ttl(pool):
    linux = await register(pool, "linux", LINUX)
    await register(pool, "mac", DARWIN)
    offers = PlatformOffers(ttl=0)
    await offers.check(pool, LINUX)
    assert not offers.remembers(LINUX)
    await pool.execute("UPDATE workers SET state = 'offline' WHERE id = $1", linux)
    with pytest.raises(FailedPrecondition, match="no online worker offers platform"):
        await offers.check(pool, LINUX)


async def test_a_no_is_never_remembered(pool):
    await register(pool, "mac", DARWIN)
    offers = PlatformOffers(ttl=3600)
    with pytest.raises(FailedPrecondition):
        await offers.check(pool, LINUX)
    assert not offers.remembers(LINUX)
    await register(pool, "linux", LINUX)
    await offers.check(pool, LINUX)  # the new worker counts at once


async def test_with_no_worker_online_nothing_is_refused_or_remembered(pool):
    offers = PlatformOffers(ttl=3600)
    await offers.check(pool, LINUX)
    assert not offers.remembers(LINUX)
