"""Who owns what, decided in the domain layer (`expbuild.scheduling`) against a real
PostgreSQL: no gRPC here, so these hold for any servicer that calls the domain functions.
(tests/test_security.py attacks the same rules through a served, token-protected server.)
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from expbuild.auth.principal import ANONYMOUS, Principal
from expbuild.cas.store import FileStore
from expbuild.db import queue
from expbuild.digest import digest_of
from expbuild.errors import NotFound, PermissionDenied
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.scheduling import results, workers
from expbuild.scheduling.completions import CompletionBatcher
from expbuild.scheduling.operations import OperationTracker

LINUX = {"OSFamily": ["Linux"]}
LEASE = timedelta(minutes=5)
ALICE = Principal.of("alice", ("worker", "execute"))
BOB = Principal.of("bob", ("worker", "execute"))
ROOT = Principal.of("root", ("admin",))


async def register(pool, principal: Principal, worker_id: str = "") -> str:
    return await workers.register(
        pool,
        principal,
        worker_id=worker_id,
        name="w",
        hostname="host",
        platform=LINUX,
        max_concurrent=2,
        version="",
    )


async def test_only_the_registering_credential_acts_for_a_worker(pool):
    worker_id = await register(pool, ALICE)
    assert await workers.acting_worker(pool, ALICE, worker_id) == worker_id
    outcome = await workers.heartbeat(pool, ALICE, worker_id, [], LEASE)
    assert outcome.known
    with pytest.raises(PermissionDenied, match="registered with another credential"):
        await workers.heartbeat(pool, BOB, worker_id, [], LEASE)
    with pytest.raises(PermissionDenied, match="register without an id"):
        await register(pool, BOB, worker_id)
    with pytest.raises(PermissionDenied):
        await workers.deregister(pool, BOB, worker_id)
    # Alice may come back under her id; with auth off (anonymous) nothing is bound.
    assert await register(pool, ALICE, worker_id) == worker_id
    assert await workers.acting_worker(pool, ANONYMOUS, worker_id) == worker_id


async def test_an_authenticated_worker_cannot_choose_an_unused_id(pool):
    assert await register(pool, ALICE, "worker-chosen") != "worker-chosen"
    # Without auth a worker keeps the id it names (restarts come back as themselves).
    assert await register(pool, ANONYMOUS, "worker-chosen") == "worker-chosen"


async def test_another_credential_cannot_report_or_hand_back_a_lease(pool, tmp_path):
    worker_id = await register(pool, ALICE)
    await queue.enqueue(
        pool, queue.NewTask("", digest_of(b"action"), platform=LINUX), "op-1", "alice"
    )
    [leased] = await queue.lease_tasks(pool, worker_id, LINUX, 1, LEASE)
    with pytest.raises(PermissionDenied):
        await results.release_lease(
            pool, BOB, worker_id, leased.task_id, leased.lease_token, "stolen"
        )
    with pytest.raises(PermissionDenied):
        await results.accept_result(
            pool,
            FileStore(tmp_path / "cas"),
            CompletionBatcher(pool),
            BOB,
            worker_id,
            leased.task_id,
            leased.lease_token,
            re_pb2.ExecuteResponse(),
        )
    assert (await queue.get_task(pool, leased.task_id)).state == "leased"
    await results.release_lease(pool, ALICE, worker_id, leased.task_id, leased.lease_token, "")
    assert (await queue.get_task(pool, leased.task_id)).state == "queued"


async def test_an_operation_is_its_creators_and_an_admins_only(pool):
    tracker = OperationTracker(pool, notifications=None)  # follow() alone needs it
    for name, owner in (("op-alice", "alice"), ("op-bob", "bob")):
        task = queue.NewTask("", digest_of(name.encode()), platform=LINUX)
        await queue.enqueue(pool, task, name, owner)
    assert (await tracker.get(ALICE, "op-alice")).principal == "alice"
    with pytest.raises(NotFound, match="does not exist"):
        await tracker.get(BOB, "op-alice")
    with pytest.raises(NotFound):
        await tracker.cancel(BOB, "op-alice")
    with pytest.raises(NotFound):
        await tracker.delete(BOB, "op-alice")
    assert (await tracker.get(ALICE, "op-alice")).cancelled_at is None

    async def listed(principal):
        return {r.name for r in (await tracker.list(principal, "", 0, "")).records}

    assert await listed(ALICE) == {"op-alice"}
    assert await listed(BOB) == {"op-bob"}
    assert await listed(ROOT) == {"op-alice", "op-bob"}
    assert await listed(ANONYMOUS) == {"op-alice", "op-bob"}  # auth off: one admin
    await tracker.cancel(ROOT, "op-alice")
    assert (await tracker.get(ALICE, "op-alice")).cancelled_at is not None
