-- One queue per platform: tasks name their required platform by a small id, and the queue
-- index leads with it, so a lease walks only the queues of platforms the worker offers.
-- With one index over every queued task, a queue mostly of tasks this worker cannot run
-- was walked (and filtered row by row) to find the few it can.

CREATE TABLE task_platforms (
    id       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The canonical {name: [sorted values]} shape that tasks.platform holds.
    platform jsonb NOT NULL UNIQUE
);

-- No foreign key: every enqueue would take a share lock on its platform's row; rows
-- here are only ever added.
ALTER TABLE tasks ADD COLUMN platform_id integer;

INSERT INTO task_platforms (platform)
SELECT DISTINCT platform FROM tasks WHERE state IN ('queued', 'leased');
UPDATE tasks t SET platform_id = p.id
FROM task_platforms p
WHERE p.platform = t.platform AND t.state IN ('queued', 'leased');

DROP INDEX tasks_queue_idx;
CREATE INDEX tasks_queue_idx ON tasks (platform_id, priority, id) WHERE state = 'queued';
ANALYZE tasks;
