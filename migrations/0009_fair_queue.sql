-- Fair scheduling between builds (issue #12.1): within a platform and a priority, tasks
-- are leased in order of a fair_rank given at enqueue (start-time fair queueing), so
-- concurrent invocations take turns instead of the oldest build taking every worker.
-- docs/scheduling.md explains the rank.

-- request_metadata: the client's RequestMetadata header as {field: value} (NULL: none sent).
-- invocation_key: whose turn a task is (the tool_invocation_id, else the principal).
ALTER TABLE tasks
    ADD COLUMN request_metadata jsonb,
    ADD COLUMN invocation_key text NOT NULL DEFAULT '',
    ADD COLUMN fair_rank bigint NOT NULL DEFAULT 0;

-- The last rank each invocation took in each platform's queue at each priority. Only
-- enqueue reads and writes a row (last_rank is in no index: its updates are HOT); the
-- reaper deletes rows that can no longer matter (sql/queue.sql forget_idle_invocations).
CREATE TABLE invocation_ranks (
    platform_id    integer NOT NULL,
    priority       integer NOT NULL,
    invocation_key text NOT NULL,
    last_rank      bigint NOT NULL,
    PRIMARY KEY (platform_id, priority, invocation_key)
) WITH (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.01);

-- Tasks queued (or leased, which may come back) before this migration belong to no
-- invocation: they keep their order as one line per platform and priority.
WITH numbered AS (
    SELECT id, row_number() OVER (PARTITION BY platform_id, priority ORDER BY id) - 1 AS rank
    FROM tasks WHERE state IN ('queued', 'leased')
)
UPDATE tasks t SET fair_rank = n.rank FROM numbered n WHERE t.id = n.id;
INSERT INTO invocation_ranks (platform_id, priority, invocation_key, last_rank)
SELECT platform_id, priority, '', max(fair_rank)
FROM tasks WHERE state IN ('queued', 'leased') AND platform_id IS NOT NULL
GROUP BY platform_id, priority;

DROP INDEX tasks_queue_idx;
CREATE INDEX tasks_queue_idx ON tasks (platform_id, priority, fair_rank, id)
    WHERE state = 'queued';
ANALYZE tasks;
