-- Operations: the names clients wait on. Many operations may share one task.

-- name: insert_cached_operation
-- An Execute answered from the action cache: the operation is born done.
-- $1 name, $2 instance_name, $3 action_digest, $4 ExecuteResponse bytes, $5 principal
INSERT INTO operations (name, instance_name, action_digest, result, principal)
VALUES ($1, $2, $3, $4, $5);

-- name: get_operation
-- The operation and, when it waits on a task, that task's state and outcome.
-- $2: only if this principal created it (NULL: anyone's).
SELECT o.name, o.instance_name, o.action_digest, o.task_id, o.result AS cached_result,
       o.cancelled_at, o.created_at, o.principal,
       t.state, t.result, t.error_code, t.error, t.worker_id, w.name AS worker_name,
       t.queued_at, t.leased_at, t.completed_at
FROM operations o LEFT JOIN tasks t ON t.id = o.task_id LEFT JOIN workers w ON w.id = t.worker_id
WHERE o.name = $1 AND ($2::text IS NULL OR o.principal = $2);

-- name: cancel_operation
-- Cancel one operation; cancel its task too when no other live operation waits on it.
-- A queued task is cancelled outright; a leased one becomes 'cancelled' as well, keeping
-- its lease token so the worker's next heartbeat is told to stop it, and its late
-- completion is refused. Returns the operation's task and whether the task was cancelled.
WITH op AS (
    UPDATE operations SET cancelled_at = coalesce(cancelled_at, now())
    WHERE name = $1 AND ($2::text IS NULL OR principal = $2)
    RETURNING name, task_id
), task AS (
    UPDATE tasks t SET state = 'cancelled', completed_at = now()
    FROM op
    WHERE t.id = op.task_id AND t.state IN ('queued', 'leased')
      AND NOT EXISTS (SELECT 1 FROM operations o
                      WHERE o.task_id = t.id AND o.name <> op.name AND o.cancelled_at IS NULL)
    RETURNING t.id, t.worker_id, t.attempts
), event AS (
    INSERT INTO task_events (task_id, event, worker_id, attempt, detail)
    SELECT id, 'cancelled', worker_id, attempts, jsonb_build_object('operation', $1::text)
    FROM task
)
SELECT op.name, op.task_id,
       (SELECT count(*) FROM task) > 0 AS task_cancelled,
       pg_notify('expbuild_task_done', coalesce(op.task_id, 0)::text) AS notified
FROM op;

-- name: delete_operation
DELETE FROM operations WHERE name = $1 AND ($2::text IS NULL OR principal = $2) RETURNING name;

-- name: list_operations
-- Newest first, optionally only those in one stage; $2 keyset cursor (created_at, name);
-- $5: only this principal's (NULL: everyone's).
SELECT o.name, o.instance_name, o.action_digest, o.task_id, o.result AS cached_result,
       o.cancelled_at, o.created_at, o.principal,
       t.state, t.result, t.error_code, t.error, t.worker_id, w.name AS worker_name,
       t.queued_at, t.leased_at, t.completed_at
FROM operations o LEFT JOIN tasks t ON t.id = o.task_id LEFT JOIN workers w ON w.id = t.worker_id
WHERE ($1::text IS NULL
       OR ($1 = 'completed' AND (o.result IS NOT NULL OR o.cancelled_at IS NOT NULL
                                 OR t.state IN ('completed', 'failed', 'cancelled')))
       OR ($1 = 'queued' AND o.cancelled_at IS NULL AND t.state = 'queued')
       OR ($1 = 'executing' AND o.cancelled_at IS NULL AND t.state = 'leased'))
  AND ($2::timestamptz IS NULL OR (o.created_at, o.name) < ($2, $3::text))
  AND ($5::text IS NULL OR o.principal = $5)
ORDER BY o.created_at DESC, o.name DESC
LIMIT $4;
