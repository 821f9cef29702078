-- Gauges for Prometheus, refreshed every few seconds by each replica.

-- name: queue_gauges
-- Counted through the partial indexes, so the cost follows the live queue, not history.
SELECT
    (SELECT count(*) FROM tasks WHERE state = 'queued') AS queued,
    (SELECT count(*) FROM tasks WHERE state = 'leased') AS leased,
    (SELECT count(*) FROM workers WHERE state = 'online') AS workers_online,
    (SELECT count(*) FROM workers WHERE state = 'draining') AS workers_draining,
    (SELECT coalesce(extract(epoch FROM now() - min(queued_at)), 0)
       FROM tasks WHERE state = 'queued') AS oldest_queued_seconds;

-- name: queue_depth
-- Unfinished tasks by state, platform requirement and instance (through the partial
-- indexes' states, so the cost follows the live queue).
SELECT state, platform, instance_name, count(*) AS tasks
FROM tasks
WHERE state IN ('queued', 'leased')
GROUP BY state, platform, instance_name;
