-- Cancellation is per operation: several operations may share one deduplicated task, and
-- one client cancelling must not cancel the others. The task is cancelled when its last
-- live operation is.
ALTER TABLE operations ADD COLUMN cancelled_at timestamptz;
CREATE INDEX operations_created_idx ON operations (created_at DESC);
