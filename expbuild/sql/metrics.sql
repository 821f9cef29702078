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
