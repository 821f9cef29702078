-- Session-level advisory locks (expbuild/db/locks.py): a process that does not get one
-- skips the work it guards (another process is at it). The lock dies with the session,
-- so a process that crashes while holding it cannot block that work.

-- name: try_advisory_lock
SELECT pg_try_advisory_lock($1::bigint) AS acquired;

-- name: advisory_unlock
SELECT pg_advisory_unlock($1::bigint) AS released;
