-- The action cache: ActionResults by (instance, action digest).

-- name: get_action_result
-- A hit refreshes last_hit_at (for eviction) at most every ten minutes, so a hot entry
-- does not cost a row write per lookup.
WITH hit AS (
    SELECT result FROM action_cache WHERE instance_name = $1 AND action_digest = $2
), touched AS (
    UPDATE action_cache SET last_hit_at = now()
    WHERE instance_name = $1 AND action_digest = $2
      AND (last_hit_at IS NULL OR last_hit_at < now() - interval '10 minutes')
)
SELECT result FROM hit;

-- name: put_action_result
INSERT INTO action_cache (instance_name, action_digest, result) VALUES ($1, $2, $3)
ON CONFLICT (instance_name, action_digest)
    DO UPDATE SET result = excluded.result, created_at = now();
