-- Operators' view of tasks: the status page and `expbuild tasks list/show`.

-- name: list_tasks
-- Newest first. $1 state (NULL: any), $2 platform the task requires at least (NULL: any;
-- '{"OSFamily": ["Linux"]}' finds tasks that require Linux), $3 queued since (NULL: any
-- time), $4 limit.
SELECT id, instance_name, action_digest, state, platform, priority, attempts, max_attempts,
       worker_id, queued_at, leased_at, completed_at, error
FROM tasks
WHERE ($1::text IS NULL OR state = $1)
  AND ($2::jsonb IS NULL OR platform @> $2::jsonb)
  AND ($3::timestamptz IS NULL OR queued_at >= $3)
ORDER BY id DESC
LIMIT $4;

-- name: task_for_operation
SELECT task_id FROM operations WHERE name = $1;

-- name: get_task_summary
SELECT id, instance_name, action_digest, state, platform, priority, attempts, max_attempts,
       worker_id, queued_at, leased_at, completed_at, error
FROM tasks WHERE id = $1;

-- name: task_events
-- The task's whole history, in order; it outlives the task row (finished tasks are purged).
SELECT e.id, e.at, e.event, e.worker_id, e.attempt, e.detail, w.name AS worker_name,
       w.hostname AS worker_hostname
FROM task_events e LEFT JOIN workers w ON w.id = e.worker_id
WHERE e.task_id = $1
ORDER BY e.id;

-- name: task_operations
SELECT name FROM operations WHERE task_id = $1 ORDER BY created_at, name;

-- name: task_state_counts
-- Tasks by state, platform and instance: the live queue, and what finished in the last
-- $1 interval.
SELECT state, platform, instance_name, count(*) AS tasks
FROM tasks
WHERE state IN ('queued', 'leased') OR completed_at >= now() - $1::interval
GROUP BY state, platform, instance_name
ORDER BY instance_name, platform::text, state;
