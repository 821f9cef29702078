-- Workers: registration, heartbeats, liveness.

-- name: register_worker
-- Insert or revive a worker. A worker re-registering under its old id comes back online.
-- Only the credential that registered an id may register it again: another principal's
-- attempt updates nothing and returns no row.
-- $1 id, $2 name, $3 hostname, $4 platform, $5 max_concurrent, $6 version, $7 principal
INSERT INTO workers (id, name, hostname, platform, max_concurrent, version, principal)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (id) DO UPDATE
SET name = excluded.name, hostname = excluded.hostname, platform = excluded.platform,
    max_concurrent = excluded.max_concurrent, version = excluded.version,
    state = 'online', last_heartbeat_at = now()
WHERE workers.principal = excluded.principal
RETURNING id, state;

-- name: worker_principal
-- The credential that registered worker $1 (no row: no such worker).
SELECT principal FROM workers WHERE id = $1;

-- name: heartbeat
-- Record that the worker lives, extend the leases it still holds, and tell it the fate of
-- each task it reports: 'running' (lease extended), 'cancelled' (stop it) or 'lost'
-- (leased elsewhere, reaped or finished: stop it and do not report it).
-- Reconciliation: a lease of this worker that it did not report (a PollTasks reply lost
-- on the way, say) expires now, for the reaper to requeue; leases granted within the
-- margin are spared (the heartbeat may have been sent before their reply arrived).
-- Only lease_expires_at and last_heartbeat_at change; neither is indexed, so these
-- updates are HOT. $1 worker_id, $2 task ids, $3 lease tokens, $4 lease duration,
-- $5 reconciliation margin
WITH alive AS (
    UPDATE workers SET last_heartbeat_at = now(),
                       state = CASE WHEN state = 'offline' THEN 'online' ELSE state END
    WHERE id = $1
    RETURNING id, state
), reported AS (
    SELECT * FROM unnest($2::bigint[], $3::uuid[]) AS r(task_id, lease_token)
), extended AS (
    UPDATE tasks t SET lease_expires_at = now() + $4::interval
    FROM reported r, alive
    WHERE t.id = r.task_id AND t.lease_token = r.lease_token
      AND t.worker_id = alive.id AND t.state = 'leased'
    RETURNING t.id
), unreported AS (
    UPDATE tasks t SET lease_expires_at = now()
    FROM alive
    WHERE t.worker_id = alive.id AND t.state = 'leased'
      AND t.id <> ALL ($2::bigint[]) AND t.leased_at < now() - $5::interval
    RETURNING t.id
)
SELECT r.task_id,
       CASE WHEN r.task_id IN (SELECT id FROM extended) THEN 'running'
            WHEN t.state = 'cancelled' AND t.lease_token = r.lease_token
                THEN 'cancelled'
            ELSE 'lost' END AS fate,
       (SELECT state FROM alive) AS worker_state,
       (SELECT count(*) FROM unreported) AS unreported
FROM reported r LEFT JOIN tasks t ON t.id = r.task_id
UNION ALL
SELECT NULL, NULL, state, (SELECT count(*) FROM unreported)
FROM alive WHERE NOT EXISTS (SELECT 1 FROM reported);

-- name: deregister_worker
-- The worker leaves cleanly. Leases it still holds go back to the queue at once, to the
-- head of their line (as queue.sql release_task).
WITH gone AS (
    UPDATE workers SET state = 'offline' WHERE id = $1 RETURNING id
), requeued AS (
    UPDATE tasks t
    SET state = 'queued', worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
        attempts = greatest(t.attempts - 1, 0),
        fair_rank = greatest(t.fair_rank, (SELECT q.fair_rank FROM tasks q
                 WHERE q.state = 'queued' AND q.platform_id = t.platform_id
                   AND q.priority = t.priority
                 ORDER BY q.fair_rank LIMIT 1))
    FROM gone WHERE t.worker_id = gone.id AND t.state = 'leased'
    RETURNING t.id, t.attempts
), event AS (
    INSERT INTO task_events (task_id, event, worker_id, attempt, detail)
    SELECT id, 'released', $1, attempts, '{"reason": "worker deregistered"}' FROM requeued
)
SELECT (SELECT count(*) FROM gone) AS found, (SELECT count(*) FROM requeued) AS requeued;

-- name: open_worker_session
-- A worker's session stream opened (on any replica): it becomes the current session and
-- the worker counts as connected. $1 worker_id, $2 session id
UPDATE workers SET session_id = $2, disconnected_at = NULL, last_heartbeat_at = now(),
                   state = CASE WHEN state = 'offline' THEN 'online' ELSE state END
WHERE id = $1
RETURNING state;

-- name: close_worker_session
-- The session broke without DeregisterWorker. Recorded only while it is still the current
-- session: the worker may already have reconnected, to this replica or another.
-- $1 worker_id, $2 session id
UPDATE workers SET disconnected_at = now()
WHERE id = $1 AND session_id = $2 AND state <> 'offline'
RETURNING id;

-- name: mark_disconnected_workers_offline
-- Workers whose session broke more than the grace ago and that neither reconnected nor
-- heartbeated since: offline, so the reaper requeues their leases. $1 grace
UPDATE workers SET state = 'offline'
WHERE state <> 'offline' AND disconnected_at < now() - $1::interval
  AND disconnected_at > last_heartbeat_at
RETURNING id;

-- name: mark_silent_workers_offline
-- $1 offline timeout
UPDATE workers SET state = 'offline'
WHERE state <> 'offline' AND last_heartbeat_at < now() - $1::interval
RETURNING id, name, last_heartbeat_at;

-- name: get_worker
SELECT id, name, hostname, platform, max_concurrent, state, version,
       registered_at, last_heartbeat_at, principal
FROM workers WHERE id = $1;

-- name: list_workers
SELECT w.id, w.name, w.hostname, w.platform, w.max_concurrent, w.state, w.version,
       w.registered_at, w.last_heartbeat_at,
       (SELECT count(*) FROM tasks t WHERE t.worker_id = w.id AND t.state = 'leased') AS running
FROM workers w
WHERE $1 OR w.state <> 'offline'
ORDER BY w.registered_at;

-- name: platform_is_offered
-- Does any online worker offer everything this platform requires? And is any worker
-- online at all (with none, nothing can be judged unsatisfiable yet)? Runs on every
-- Execute, so the list of what workers do offer (for the error message) is only built
-- when the answer is no: an uncorrelated subquery in an untaken CASE branch never runs.
WITH answer AS (
    SELECT EXISTS (SELECT 1 FROM workers
                   WHERE state <> 'offline' AND platform @> $1::jsonb) AS offered,
           EXISTS (SELECT 1 FROM workers WHERE state <> 'offline') AS any_online
)
SELECT offered, any_online,
       CASE WHEN offered OR NOT any_online THEN '[]'::jsonb
            ELSE (SELECT coalesce(jsonb_agg(DISTINCT platform), '[]'::jsonb)
                  FROM workers WHERE state <> 'offline') END AS offers
FROM answer;

-- name: drain_worker
-- Ask a worker (by id, or by name when exactly one live worker has it) to drain; it learns
-- at its next heartbeat. Returns nothing when no such worker is online.
UPDATE workers SET state = 'draining'
WHERE state <> 'offline'
  AND (id = $1 OR (name = $1 AND (SELECT count(*) FROM workers w
                                  WHERE w.name = $1 AND w.state <> 'offline') = 1))
RETURNING id;
