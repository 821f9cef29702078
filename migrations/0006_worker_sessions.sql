-- A worker's session stream (WorkerService.OpenSession): which session is the current one,
-- and when it broke without a DeregisterWorker. Neither column is indexed, so heartbeats
-- stay HOT updates.
ALTER TABLE workers
    ADD COLUMN session_id uuid,
    ADD COLUMN disconnected_at timestamptz;
