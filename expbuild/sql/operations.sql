-- Operations: the names clients wait on. Many operations may share one task.

-- name: insert_cached_operation
-- An Execute answered from the action cache: the operation is born done.
-- $1 name, $2 instance_name, $3 action_digest, $4 ExecuteResponse bytes
INSERT INTO operations (name, instance_name, action_digest, result) VALUES ($1, $2, $3, $4);

-- name: get_operation
-- The operation and, when it waits on a task, that task's state and outcome.
SELECT o.name, o.instance_name, o.action_digest, o.task_id, o.result AS cached_result,
       t.state, t.result, t.error_code, t.error, t.worker_id, t.queued_at, t.leased_at,
       t.completed_at
FROM operations o LEFT JOIN tasks t ON t.id = o.task_id
WHERE o.name = $1;
