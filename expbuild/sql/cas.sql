-- The filesystem CAS's LRU eviction (expbuild/cas/eviction.py). Replicas that share one
-- CAS directory take turns: a pass runs only while its replica holds this session-level
-- advisory lock, on a connection set aside from the pool for the whole pass. A replica
-- that does not get it skips the pass (another one is evicting). The lock dies with the
-- session, so a replica that crashes mid-pass cannot block eviction.

-- name: cas_eviction_try_lock
SELECT pg_try_advisory_lock($1::bigint) AS acquired;

-- name: cas_eviction_unlock
SELECT pg_advisory_unlock($1::bigint) AS released;
