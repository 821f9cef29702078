"""The queue as a state machine, tested by property (issue #9.9), against a real PostgreSQL.

Hypothesis interleaves enqueue, lease, heartbeat (with reconciliation), complete, release,
lease expiry and reaping, cancellation and worker loss (a broken session past its grace)
at random, and checks after every step that:

- a task is leased to exactly one worker under exactly one token, and only the latest
  token handed out for it can complete or release it;
- at most one queued-or-leased task exists per cacheable action;
- a finished task never changes again;
- no task is leased more than max_attempts times (releases do not count);

and, at the end, that every operation finishes once workers keep serving. The number of
examples is kept small: each one runs its statements against the database.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from expbuild.db import operations as db_operations
from expbuild.db import queue, workers
from expbuild.db.pool import create_pool
from expbuild.digest import digest_of
from expbuild.errors import Aborted
from tests.conftest import create_from_template, drop_database

LINUX = {"OSFamily": ["Linux"]}
LEASE = timedelta(minutes=5)
MAX_ATTEMPTS = 2
_databases = itertools.count()


class QueueMachine(RuleBasedStateMachine):
    admin_url = ""  # set by the test

    workers = Bundle("workers")

    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.database = f"expbuild_props_{uuid.uuid4().hex[:12]}"
        url = self.run(create_from_template(self.admin_url, self.database))
        self.pool = self.run(create_pool(url, min_size=1, max_size=2))
        self.operations: list[str] = []
        self.leases: list[tuple[int, str, str]] = []  # (task, token, worker) ever handed out
        self.latest: dict[int, str] = {}  # task -> the last token handed out
        self.finished: dict[int, tuple] = {}  # task -> its row when first seen finished

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        try:
            self.run(self._drain())
        finally:
            self.run(self.pool.close())
            self.run(drop_database(self.admin_url, self.database))
            self.loop.close()

    async def _drain(self) -> None:
        """Every operation ends once a worker keeps serving and leases keep expiring."""
        drainer = await workers.register_worker(
            self.pool, worker_id="", name="drainer", hostname="", platform=LINUX, max_concurrent=8
        )
        for _ in range(3 * MAX_ATTEMPTS + 3):
            await self.pool.execute(
                "UPDATE tasks SET lease_expires_at = now() - interval '1 s' WHERE state = 'leased'"
            )
            await queue.reap_expired_leases(self.pool)
            for task in await queue.lease_tasks(self.pool, drainer, LINUX, 100, LEASE):
                await queue.complete_task(
                    self.pool,
                    task.task_id,
                    task.lease_token,
                    drainer,
                    succeeded=True,
                    response=b"",
                    cache_result=None,
                )
            if not await self.pool.fetchval(
                "SELECT count(*) FROM tasks WHERE state IN ('queued', 'leased')"
            ):
                break
        for name in self.operations:
            record = await db_operations.get_operation(self.pool, name)
            assert record.done, f"operation {name} never ended ({record.task_state})"

    # ---- rules ------------------------------------------------------------------------

    @initialize(target=workers)
    def first_worker(self):
        return self._register()

    @rule(target=workers)
    def another_worker(self):
        return self._register()

    def _register(self) -> str:
        return self.run(
            workers.register_worker(
                self.pool, worker_id="", name="w", hostname="", platform=LINUX, max_concurrent=4
            )
        )

    @rule(action=st.integers(0, 4), do_not_cache=st.booleans())
    def enqueue(self, action, do_not_cache):
        name = str(uuid.uuid4())
        task = queue.NewTask(
            "",
            digest_of(f"action-{action}".encode()),
            LINUX,
            do_not_cache=do_not_cache,
            max_attempts=MAX_ATTEMPTS,
        )
        self.run(queue.enqueue(self.pool, task, name))
        self.operations.append(name)

    @rule(worker=workers, count=st.integers(1, 3))
    def lease(self, worker, count):
        for task in self.run(queue.lease_tasks(self.pool, worker, LINUX, count, LEASE)):
            assert task.lease_token not in {t for _, t, _ in self.leases}
            self.leases.append((task.task_id, task.lease_token, worker))
            self.latest[task.task_id] = task.lease_token

    @rule(worker=workers, forget=st.booleans())
    def heartbeat(self, worker, forget):
        """Report the worker's leases (forgetting one: a reply lost on the way)."""
        held = [(task, token) for task, token, w in self.leases if w == worker]
        if forget and held:
            held = held[1:]
        outcome = self.run(workers.heartbeat(self.pool, worker, held, LEASE, timedelta(0)))
        if outcome.unreported:
            self.run(queue.reap_expired_leases(self.pool))

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), succeed=st.booleans())
    def complete(self, data, succeed):
        task, token, worker = data.draw(st.sampled_from(self.leases))
        current = self._lease_holder(task)
        try:
            self.run(
                queue.complete_task(
                    self.pool,
                    task,
                    token,
                    worker,
                    succeeded=succeed,
                    response=b"result",
                    cache_result=b"cached" if succeed else None,
                )
            )
            accepted = True
        except Aborted:
            accepted = False
        assert accepted == (current == (token, worker)), (task, current, token, worker)
        if accepted:
            assert token == self.latest[task], "a lease older than the latest completed"

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data):
        task, token, worker = data.draw(st.sampled_from(self.leases))
        current = self._lease_holder(task)
        try:
            self.run(queue.release_task(self.pool, task, token, worker, "test"))
            accepted = True
        except Aborted:
            accepted = False
        assert accepted == (current == (token, worker))

    def _lease_holder(self, task: int) -> tuple[str, str] | None:
        row = self.run(
            self.pool.fetchrow(
                "SELECT lease_token::text AS token, worker_id FROM tasks "
                "WHERE id = $1 AND state = 'leased'",
                task,
            )
        )
        return None if row is None else (row["token"], row["worker_id"])

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def lease_expires(self, data):
        task, _, _ = data.draw(st.sampled_from(self.leases))
        self.run(
            self.pool.execute(
                "UPDATE tasks SET lease_expires_at = now() - interval '1 s' WHERE id = $1", task
            )
        )
        self.run(queue.reap_expired_leases(self.pool))

    @precondition(lambda self: self.operations)
    @rule(data=st.data())
    def cancel(self, data):
        name = data.draw(st.sampled_from(self.operations))
        self.run(db_operations.cancel_operation(self.pool, name))

    @rule(worker=workers)
    def lose_worker(self, worker):
        """The worker's session breaks and its grace passes (0 here)."""
        session = uuid.uuid4()
        self.run(workers.open_session(self.pool, worker, session))
        self.run(workers.close_session(self.pool, worker, session))
        self.run(workers.mark_disconnected_workers_offline(self.pool, timedelta(0)))
        self.run(queue.reap_expired_leases(self.pool))

    # ---- invariants -------------------------------------------------------------------

    @invariant()
    def leases_are_whole(self):
        broken = self.run(
            self.pool.fetchval(
                # A cancelled task keeps its token: its worker learns at the next heartbeat.
                "SELECT count(*) FROM tasks WHERE (state = 'leased' AND "
                "(lease_token IS NULL OR worker_id IS NULL)) OR (state = 'queued' AND "
                "(lease_token IS NOT NULL OR worker_id IS NOT NULL))"
            )
        )
        assert broken == 0

    @invariant()
    def one_in_flight_task_per_cacheable_action(self):
        twins = self.run(
            self.pool.fetch(
                "SELECT action_digest FROM tasks WHERE state IN ('queued', 'leased') "
                "AND NOT do_not_cache GROUP BY instance_name, action_digest HAVING count(*) > 1"
            )
        )
        assert twins == []

    @invariant()
    def attempts_stay_within_the_maximum(self):
        over = self.run(
            self.pool.fetchval("SELECT count(*) FROM tasks WHERE attempts > max_attempts")
        )
        assert over == 0

    @invariant()
    def finished_tasks_never_change(self):
        rows = self.run(
            self.pool.fetch(
                "SELECT id, state, result, error, completed_at FROM tasks "
                "WHERE state IN ('completed', 'failed', 'cancelled')"
            )
        )
        for row in rows:
            seen = tuple(row)
            assert self.finished.setdefault(row["id"], seen) == seen, f"task {row['id']} changed"


def test_the_queue_keeps_its_invariants_under_any_interleaving(postgres_admin_url):
    QueueMachine.admin_url = postgres_admin_url
    machine_test = QueueMachine.TestCase
    machine_test.settings = settings(
        max_examples=15,
        stateful_step_count=20,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        database=None,
    )
    machine_test().runTest()
