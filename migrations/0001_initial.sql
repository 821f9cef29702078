-- ExpBuild schema, version 1: workers, the task queue, operations, the action cache
-- and the append-only audit history.

CREATE TABLE workers (
    id                text PRIMARY KEY,
    name              text NOT NULL,
    hostname          text NOT NULL DEFAULT '',
    -- {"OSFamily": ["Linux"], "Arch": ["x86_64"]}: every value the worker offers per key.
    platform          jsonb NOT NULL DEFAULT '{}',
    max_concurrent    integer NOT NULL CHECK (max_concurrent > 0),
    state             text NOT NULL DEFAULT 'online'
                      CHECK (state IN ('online', 'draining', 'offline')),
    version           text NOT NULL DEFAULT '',
    registered_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tasks (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_name    text NOT NULL,
    action_digest    text NOT NULL,                 -- "<sha256>/<size>"
    -- Requirement in the workers.platform shape; a worker matches when it contains this.
    platform         jsonb NOT NULL DEFAULT '{}',
    priority         integer NOT NULL DEFAULT 0,    -- lower runs sooner (REAPI)
    do_not_cache     boolean NOT NULL DEFAULT false,
    timeout          interval,
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'leased', 'completed', 'failed', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3 CHECK (max_attempts > 0),
    worker_id        text,
    lease_token      uuid,                          -- fencing token, new at every lease
    lease_expires_at timestamptz,                   -- in no index: heartbeats stay HOT updates
    cancel_requested boolean NOT NULL DEFAULT false,
    queued_at        timestamptz NOT NULL DEFAULT now(),
    leased_at        timestamptz,
    completed_at     timestamptz,
    result           bytea,                         -- serialized ExecuteResponse from the worker
    error_code       integer,                       -- google.rpc.Code when the server failed it
    error            text
);

-- The queue: only queued rows, in the order they are handed out.
CREATE INDEX tasks_queue_idx ON tasks (priority, id) WHERE state = 'queued';
-- Leases: the reaper and heartbeats find leased rows through this small index.
CREATE INDEX tasks_leased_idx ON tasks (worker_id) WHERE state = 'leased';
-- At most one in-flight task per cacheable action: identical Executes join it.
CREATE UNIQUE INDEX tasks_in_flight_idx ON tasks (instance_name, action_digest)
    WHERE state IN ('queued', 'leased') AND NOT do_not_cache;

ALTER TABLE tasks SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02,
    fillfactor = 80                                 -- room on each page for HOT updates
);

CREATE TABLE operations (
    name          text PRIMARY KEY,
    instance_name text NOT NULL,
    action_digest text NOT NULL,
    task_id       bigint REFERENCES tasks (id) ON DELETE CASCADE,
    -- Set instead of task_id when Execute was answered from the action cache.
    result        bytea,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX operations_task_idx ON operations (task_id);

CREATE TABLE action_cache (
    instance_name text NOT NULL,
    action_digest text NOT NULL,
    result        bytea NOT NULL,                   -- serialized ActionResult
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_hit_at   timestamptz,
    PRIMARY KEY (instance_name, action_digest)
);

-- Append-only: never updated, never deleted with the task it describes.
CREATE TABLE task_events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id   bigint NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    event     text NOT NULL
              CHECK (event IN ('queued', 'leased', 'heartbeat-missed', 'lease-expired', 'released',
                               'requeued', 'completed', 'failed', 'cancelled', 'stale-completion')),
    worker_id text,
    attempt   integer,
    detail    jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX task_events_task_idx ON task_events (task_id, id);

-- One row per task: what ran where, how long it waited and ran, how often it was retried.
CREATE VIEW task_history AS
SELECT t.id AS task_id,
       t.instance_name,
       t.action_digest,
       t.state,
       t.priority,
       t.attempts,
       t.worker_id AS last_worker_id,
       t.queued_at,
       t.leased_at,
       t.completed_at,
       t.leased_at - t.queued_at AS last_wait,
       t.completed_at - t.leased_at AS last_run,
       t.error,
       (SELECT count(*) FROM task_events e WHERE e.task_id = t.id AND e.event = 'requeued') AS requeues,
       (SELECT array_agg(DISTINCT e.worker_id) FROM task_events e
         WHERE e.task_id = t.id AND e.event = 'leased') AS workers
FROM tasks t;
