-- Cancellation is recorded per operation (0002) and on the task's state; nothing ever set
-- tasks.cancel_requested, so it goes. No index or view uses it.
ALTER TABLE tasks DROP COLUMN cancel_requested;
