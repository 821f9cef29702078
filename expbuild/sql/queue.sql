-- The task queue. Every statement here is one round trip; the CTEs keep the task row,
-- its audit event, its operation and its NOTIFY in the same transaction.

-- name: enqueue_task
-- Insert a task, or join the in-flight task of the same cacheable action, and record the
-- operation that waits on it. Returns no row when the in-flight task finished between the
-- insert attempt and the lookup; the caller retries. NOTIFY only when a task was added.
-- A new task takes its fair_rank (start-time fair queueing, docs/scheduling.md): the
-- invocation's last rank in this platform's queue at this priority + 1, but never less
-- than the queue's virtual time, the smallest rank still queued there (when nothing is,
-- the largest rank taken). The upsert of the invocation's row serialises its enqueues, so
-- concurrent Executes of one build take distinct ranks; a joined task keeps its own.
-- $1 instance_name, $2 action_digest, $3 platform, $4 priority, $5 do_not_cache,
-- $6 timeout, $7 max_attempts, $8 operation name, $9 principal, $10 invocation_key,
-- $11 request_metadata (jsonb or NULL)
WITH known_platform AS (
    SELECT id FROM task_platforms WHERE platform = $3::jsonb
), new_platform AS (
    -- The first task of a platform makes its queue. A concurrent first insert of the
    -- same platform leaves both CTEs empty: no task is inserted, no row comes back, and
    -- the caller's retry finds the platform.
    INSERT INTO task_platforms (platform)
    SELECT $3::jsonb WHERE NOT EXISTS (SELECT 1 FROM known_platform)
    ON CONFLICT (platform) DO NOTHING
    RETURNING id
), platform AS (
    SELECT id FROM known_platform UNION ALL SELECT id FROM new_platform
), twin AS (
    SELECT 1 FROM tasks
    WHERE instance_name = $1 AND action_digest = $2
      AND state IN ('queued', 'leased') AND NOT do_not_cache AND NOT $5::boolean
), ranked AS (
    INSERT INTO invocation_ranks AS r (platform_id, priority, invocation_key, last_rank)
    SELECT p.id, $4, $10, coalesce(
        (SELECT t.fair_rank FROM tasks t
         WHERE t.state = 'queued' AND t.platform_id = p.id AND t.priority = $4
         ORDER BY t.fair_rank LIMIT 1),
        (SELECT max(m.last_rank) FROM invocation_ranks m
         WHERE m.platform_id = p.id AND m.priority = $4),
        0)
    FROM platform p
    WHERE NOT EXISTS (SELECT 1 FROM twin)
    ON CONFLICT (platform_id, priority, invocation_key)
        DO UPDATE SET last_rank = greatest(r.last_rank + 1, excluded.last_rank)
    RETURNING r.platform_id, r.last_rank AS fair_rank
), inserted AS (
    INSERT INTO tasks (instance_name, action_digest, platform, priority, do_not_cache,
                       timeout, max_attempts, platform_id, invocation_key, request_metadata,
                       fair_rank)
    SELECT $1, $2, $3, $4, $5, $6, $7, ranked.platform_id, $10, $11::jsonb, ranked.fair_rank
    FROM ranked
    ON CONFLICT (instance_name, action_digest)
        WHERE state IN ('queued', 'leased') AND NOT do_not_cache
        DO NOTHING
    RETURNING id, priority, fair_rank
), joined AS (
    SELECT id, priority FROM tasks
    WHERE instance_name = $1 AND action_digest = $2
      AND state IN ('queued', 'leased') AND NOT do_not_cache
      AND NOT EXISTS (SELECT 1 FROM inserted)
), chosen AS (
    SELECT id, priority, true AS is_new FROM inserted
    UNION ALL
    SELECT id, priority, false FROM joined
), event AS (
    -- Which build queued the task, for SQL: detail->'request_metadata'->>'target_id'.
    INSERT INTO task_events (task_id, event, attempt, detail)
    SELECT id, 'queued', 0,
           jsonb_strip_nulls(jsonb_build_object(
               'priority', priority, 'invocation', $10::text, 'fair_rank', fair_rank,
               'request_metadata', $11::jsonb))
    FROM inserted
), operation AS (
    INSERT INTO operations (name, instance_name, action_digest, task_id, principal)
    SELECT $8, $1, $2, id, $9 FROM chosen
    RETURNING task_id
)
SELECT c.id AS task_id, c.is_new,
       CASE WHEN c.is_new THEN pg_notify('expbuild_task_queued', '') END AS notified
FROM chosen c JOIN operation o ON o.task_id = c.id;

-- name: count_queued_tasks
-- For [server] max_queued_tasks: counts along the queue index and stops at $2.
-- $1 instance_name, $2 count up to
SELECT count(*) FROM (
    SELECT 1 FROM tasks WHERE state = 'queued' AND instance_name = $1 LIMIT $2
) AS queued;

-- name: lease_tasks
-- Hand up to {limit} queued tasks whose platform the worker satisfies to worker $1: the most
-- urgent priority first, then in fair_rank order (invocations take turns, see
-- enqueue_task), then oldest first. SKIP LOCKED lets any number of pollers run this at
-- once. Each platform the worker satisfies is its own range of tasks_queue_idx, walked in
-- (priority, fair_rank, id) order for at most {limit} rows; queues of other platforms are never
-- read, so the cost does not grow with the queue (bench/queue_throughput.py --scale).
-- Ranks of two platforms' queues are not comparable (each has its own virtual time), so
-- the queues are merged by each task's distance from its queue's head.
-- {limit} is not a parameter: db/queue.py lease_statement writes the number into the text
-- (one prepared statement per limit). With LIMIT $n PostgreSQL costs a generic plan as
-- if 10 % of the queue were leased, never picks it, and plans every call afresh: ~0.2 ms
-- of CPU per lease, a quarter of what leasing and completing one task cost PostgreSQL
-- (docs/performance.md).
-- Only an online worker (not draining, offline or unknown) whose registered platform still
-- offers $2 leases anything: the poll need not read the worker first (it caches $2).
-- $1 worker_id, $2 worker platform, $3 lease duration
WITH worker AS (
    SELECT name FROM workers WHERE id = $1 AND state = 'online' AND platform @> $2::jsonb
), offered AS (
    SELECT id FROM task_platforms WHERE platform <@ $2::jsonb AND EXISTS (SELECT 1 FROM worker)
), candidates AS (
    SELECT c.id, c.priority,
           c.fair_rank - min(c.fair_rank) OVER (PARTITION BY offered.id, c.priority) AS behind
    FROM offered
    CROSS JOIN LATERAL (
        SELECT t.id, t.priority, t.fair_rank FROM tasks t
        WHERE t.state = 'queued' AND t.platform_id = offered.id
        ORDER BY t.priority, t.fair_rank, t.id
        LIMIT {limit}
        FOR UPDATE SKIP LOCKED
    ) c
), picked AS (
    SELECT id, row_number() OVER (ORDER BY priority, behind, id) AS turn
    FROM candidates
    ORDER BY turn
    LIMIT {limit}
), leased AS (
    UPDATE tasks t
    SET state = 'leased', worker_id = $1, lease_token = gen_random_uuid(),
        lease_expires_at = now() + $3::interval, leased_at = now(),
        attempts = t.attempts + 1
    FROM picked
    WHERE t.id = picked.id
    RETURNING t.id, t.lease_token, t.instance_name, t.action_digest, t.attempts,
              t.queued_at, t.timeout, t.do_not_cache, picked.turn
), event AS (
    INSERT INTO task_events (task_id, event, worker_id, attempt)
    SELECT id, 'leased', $1, attempts FROM leased
), notified AS (
    -- Tells clients streaming these tasks that they are now EXECUTING, with what that
    -- stage shows, so that they need not read the task (db/notifications.py): one NOTIFY
    -- for the batch, `leased <leased_at> <id>:<queued_at>,… <worker name>` (times in
    -- microseconds since the epoch), at most 100 tasks in one (a payload stays under
    -- 8,000 bytes; a worker name is at most 255 characters).
    SELECT pg_notify('expbuild_task_done', concat_ws(' ', 'leased',
               (extract(epoch FROM now()) * 1000000)::bigint,
               string_agg(id || ':' || (extract(epoch FROM queued_at) * 1000000)::bigint, ','),
               (SELECT name FROM worker)))
    FROM (SELECT id, queued_at, (row_number() OVER () - 1) / 100 AS chunk FROM leased) ids
    GROUP BY chunk
)
-- The scalar subquery makes the notified CTE run (a SELECT CTE runs only when read).
SELECT id, lease_token::text AS lease_token, instance_name, action_digest, attempts,
       queued_at, timeout, do_not_cache, (SELECT count(*) FROM notified) AS notifications
FROM leased ORDER BY turn;

-- name: complete_task
-- Accept a worker's result only under the current lease. No row back means the token is
-- stale (re-leased, reaped, cancelled or already completed) and nothing was changed.
-- For the metrics it returns the platform as JSON text and the seconds the task waited
-- and ran: decoding a jsonb and three timestamps per row cost the client ~3 us a task,
-- a tenth of what completing one costs in a batch of 32 (docs/performance.md).
-- $1 task_id, $2 lease_token, $3 worker_id, $4 final state, $5 ExecuteResponse bytes,
-- $6 ActionResult bytes to cache (NULL: do not cache; ignored for do_not_cache tasks),
-- $7 event detail (NULL: none)
WITH done AS (
    UPDATE tasks
    SET state = $4, result = $5, completed_at = now(), lease_expires_at = NULL
    WHERE id = $1 AND lease_token = $2 AND worker_id = $3 AND state = 'leased'
    RETURNING id, instance_name, action_digest, attempts, worker_id, do_not_cache, platform,
              queued_at, leased_at, completed_at
), event AS (
    INSERT INTO task_events (task_id, event, worker_id, attempt, detail)
    SELECT id, $4, worker_id, attempts, coalesce($7::jsonb, '{}') FROM done
), cached AS (
    INSERT INTO action_cache (instance_name, action_digest, result)
    SELECT instance_name, action_digest, $6 FROM done
    WHERE $6::bytea IS NOT NULL AND NOT do_not_cache
    ON CONFLICT (instance_name, action_digest)
        DO UPDATE SET result = excluded.result, created_at = now()
)
SELECT id, instance_name, platform::text AS platform,
       extract(epoch FROM leased_at - queued_at)::float8 AS waited,
       extract(epoch FROM completed_at - leased_at)::float8 AS ran,
       pg_notify('expbuild_task_done', id::text) AS notified
FROM done;

-- name: complete_tasks
-- complete_task for several leases, of one worker or many, in one statement (and one
-- commit): each element is applied only under its own current lease and worker; the
-- elements applied come back with complete_task's columns (for the metrics) and their
-- position n in the arrays (1-based), the rest changed nothing. Of two elements
-- for one task at most one is applied.
-- $1 task ids, $2 lease tokens, $3 worker ids, $4 final states, $5 ExecuteResponse bytes,
-- $6 ActionResult bytes to cache (NULL elements: do not cache), $7 event details (NULL
-- elements: none; spares the client encoding an empty object per task)
-- Each task is found by its primary key. `state || ''` keeps tasks_leased_idx out: with
-- statistics taken while few tasks were leased the planner walked every lease of every
-- worker for each element (O(elements x leases)). {limit} (db/queue.py complete_statement:
-- the element count rounded up to a power of two) caps the generic plan's estimate of the
-- input, 10 rows otherwise: a completion of one task then costs the same in the generic
-- plan as in a custom one, and runs from the cached plan instead of being planned afresh.
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::bytea[],
                         $6::bytea[], $7::jsonb[])
        WITH ORDINALITY AS i(id, token, worker_id, state, result, cache_result, detail, n)
    LIMIT {limit}
), done AS (
    UPDATE tasks t
    SET state = i.state, result = i.result, completed_at = now(), lease_expires_at = NULL
    FROM input i
    WHERE t.id = i.id AND t.lease_token = i.token AND t.worker_id = i.worker_id
      AND t.state || '' = 'leased'
    RETURNING t.id, t.instance_name, t.action_digest, t.attempts, t.worker_id, t.do_not_cache,
              t.platform, t.queued_at, t.leased_at, t.completed_at,
              i.state AS final_state, i.cache_result, i.detail, i.n
), event AS (
    INSERT INTO task_events (task_id, event, worker_id, attempt, detail)
    SELECT id, final_state, worker_id, attempts, coalesce(detail, '{}') FROM done ORDER BY id
), cached AS (
    INSERT INTO action_cache (instance_name, action_digest, result)
    SELECT DISTINCT ON (instance_name, action_digest) instance_name, action_digest, cache_result
    FROM done
    WHERE cache_result IS NOT NULL AND NOT do_not_cache
    ORDER BY instance_name, action_digest, id DESC
    ON CONFLICT (instance_name, action_digest)
        DO UPDATE SET result = excluded.result, created_at = now()
), notified AS (
    -- One NOTIFY per statement, not per task: its payload is the ids, comma-separated,
    -- at most 300 of them (a payload must stay under 8,000 bytes); the listener
    -- (db/notifications.py) wakes the streams of each. A NOTIFY per task cost each
    -- statement as many entries in the notification queue.
    SELECT pg_notify('expbuild_task_done', string_agg(id::text, ',')) FROM (
        SELECT id, (row_number() OVER () - 1) / 300 AS chunk FROM done
    ) ids GROUP BY chunk
)
-- The scalar subquery makes the notified CTE run (a SELECT CTE runs only when read).
SELECT id, n, instance_name, platform::text AS platform,
       extract(epoch FROM leased_at - queued_at)::float8 AS waited,
       extract(epoch FROM completed_at - leased_at)::float8 AS ran,
       (SELECT count(*) FROM notified) AS notifications
FROM done;

-- name: release_task
-- A worker hands back a lease it will not finish (shutdown): the task is queued again at
-- once and the attempt is not counted against it. Like every requeue it goes back to the
-- head of its line: its fair_rank, raised to the queue's virtual time if the queue moved
-- on (an old rank left in the queue would drag the virtual time back, and hand the next
-- new build a run of turns).
-- $1 task_id, $2 lease_token, $3 worker_id, $4 reason
WITH released AS (
    UPDATE tasks t
    SET state = 'queued', worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
        attempts = greatest(t.attempts - 1, 0),
        fair_rank = greatest(t.fair_rank, (SELECT q.fair_rank FROM tasks q
                 WHERE q.state = 'queued' AND q.platform_id = t.platform_id
                   AND q.priority = t.priority
                 ORDER BY q.fair_rank LIMIT 1))
    WHERE t.id = $1 AND t.lease_token = $2 AND t.worker_id = $3 AND t.state = 'leased'
    RETURNING t.id, t.attempts
), event AS (
    INSERT INTO task_events (task_id, event, worker_id, attempt, detail)
    SELECT id, 'released', $3, attempts, jsonb_build_object('reason', $4::text) FROM released
)
SELECT id, pg_notify('expbuild_task_queued', '') AS notified FROM released;

-- name: describe_task_lease
-- Why a completion or release was refused: the task's current state.
SELECT id, state, worker_id, attempts, lease_token FROM tasks WHERE id = $1;

-- name: reap_expired_leases
-- Requeue leased tasks whose lease ran out or whose worker went offline or vanished; fail
-- those that used up their attempts. Idempotent and safe on every replica at once.
-- $1 batch size
WITH expired AS (
    SELECT t.id, t.worker_id,
           CASE WHEN w.id IS NULL THEN 'worker-gone'
                WHEN w.state = 'offline' AND w.disconnected_at IS NOT NULL THEN 'session-lost'
                WHEN w.state = 'offline' THEN 'heartbeat-missed'
                ELSE 'lease-expired' END AS reason
    FROM tasks t LEFT JOIN workers w ON w.id = t.worker_id
    WHERE t.state = 'leased'
      AND (t.lease_expires_at < now() OR w.id IS NULL OR w.state = 'offline')
    FOR UPDATE OF t SKIP LOCKED
    LIMIT $1
), reaped AS (
    UPDATE tasks t
    SET state = CASE WHEN t.attempts >= t.max_attempts THEN 'failed' ELSE 'queued' END,
        completed_at = CASE WHEN t.attempts >= t.max_attempts THEN now() END,
        error_code = CASE WHEN t.attempts >= t.max_attempts THEN 14 END,  -- UNAVAILABLE
        error = CASE WHEN t.attempts >= t.max_attempts THEN
            format('task failed after %s attempts; last attempt on worker %s: %s',
                   t.attempts, t.worker_id, replace(e.reason, '-', ' ')) END,
        worker_id = NULL, lease_token = NULL, lease_expires_at = NULL,
        -- Back to the head of its line, as in release_task.
        fair_rank = greatest(t.fair_rank, (SELECT q.fair_rank FROM tasks q
                 WHERE q.state = 'queued' AND q.platform_id = t.platform_id
                   AND q.priority = t.priority
                 ORDER BY q.fair_rank LIMIT 1))
    FROM expired e
    WHERE t.id = e.id
    RETURNING t.id, t.state, t.attempts, e.reason, e.worker_id
), event AS (
    -- Why the lease ended, then what became of the task, in that order.
    INSERT INTO task_events (task_id, event, worker_id, attempt, detail)
    SELECT id, event, worker_id, attempts, jsonb_build_object('reason', reason)
    FROM (
        SELECT id, worker_id, attempts, reason, 1 AS step,
               CASE WHEN reason = 'lease-expired' THEN 'lease-expired'
                    ELSE 'heartbeat-missed' END AS event
        FROM reaped
        UNION ALL
        SELECT id, worker_id, attempts, reason, 2,
               CASE WHEN state = 'failed' THEN 'failed' ELSE 'requeued' END
        FROM reaped
    ) steps
    ORDER BY id, step
)
SELECT id, state, attempts, reason, worker_id,
       CASE WHEN state = 'failed' THEN pg_notify('expbuild_task_done', id::text)
            -- Distinct payloads: Postgres folds identical notifications of one
            -- transaction into one, and each requeued task should wake one poller.
            ELSE pg_notify('expbuild_task_queued', id::text) END AS notified
FROM reaped;

-- name: get_task
SELECT id, instance_name, action_digest, state, priority, attempts, max_attempts,
       worker_id, queued_at, leased_at, completed_at, result, error_code, error,
       do_not_cache, timeout
FROM tasks WHERE id = $1;


-- name: forget_idle_invocations
-- Keep invocation_ranks small: an invocation whose last rank is below its queue's virtual
-- time has nothing queued there, and its next task would take the virtual time anyway, so
-- its row changes nothing. When a queue is empty only its largest rank is kept, as the
-- virtual time its next task starts from. Rows an enqueue holds are skipped.
-- $1 batch size
WITH idle AS (
    SELECT r.platform_id, r.priority, r.invocation_key FROM invocation_ranks r
    WHERE r.last_rank < coalesce(
        (SELECT t.fair_rank FROM tasks t
         WHERE t.state = 'queued' AND t.platform_id = r.platform_id AND t.priority = r.priority
         ORDER BY t.fair_rank LIMIT 1),
        (SELECT max(m.last_rank) FROM invocation_ranks m
         WHERE m.platform_id = r.platform_id AND m.priority = r.priority))
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
DELETE FROM invocation_ranks r USING idle i
WHERE r.platform_id = i.platform_id AND r.priority = i.priority
  AND r.invocation_key = i.invocation_key
RETURNING r.invocation_key;

-- name: purge_finished_tasks
-- Keep the hot table small: finished tasks older than the retention go (their operations
-- with them); their history stays in task_events. Batched so no pass holds locks long.
-- $1 retention, $2 batch size
WITH old AS (
    SELECT id FROM tasks
    WHERE state IN ('completed', 'failed', 'cancelled') AND completed_at < now() - $1::interval
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM tasks t USING old WHERE t.id = old.id
RETURNING t.id;

-- name: purge_task_events
-- The history goes oldest first: the first $2 events by id (ids grow with time), those of
-- them older than the retention $1: a walk of the primary key's first entries, whatever
-- the table's size. Only those rows are locked (a pass with nothing to delete writes
-- nothing); replicas purging at once skip each other's.
-- $1 retention, $2 batch size
WITH oldest AS MATERIALIZED (
    SELECT id, at FROM task_events ORDER BY id LIMIT $2
), doomed AS (
    SELECT e.id FROM oldest JOIN task_events e ON e.id = oldest.id
    WHERE oldest.at < now() - $1::interval
    FOR UPDATE OF e SKIP LOCKED
)
DELETE FROM task_events e USING doomed
WHERE e.id = doomed.id
RETURNING e.id;
