-- Bearer tokens (expbuild/db/tokens.py). Secrets are never stored, only their SHA-256.

-- name: create_token
-- $1 name, $2 secret sha256, $3 scopes, $4 instances, $5 expires_at (NULL: never)
INSERT INTO tokens (name, secret_sha256, scopes, instances, expires_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (name) DO NOTHING
RETURNING name, scopes, instances, created_at, expires_at, revoked_at, last_used_at;

-- name: find_token
-- The token whose secret hashes to $1; marks it used when it is still valid.
WITH found AS (
    SELECT name, secret_sha256, scopes, instances, created_at, expires_at, revoked_at,
           last_used_at
    FROM tokens WHERE secret_sha256 = $1
), used AS (
    UPDATE tokens SET last_used_at = now()
    WHERE secret_sha256 = $1 AND revoked_at IS NULL
      AND (expires_at IS NULL OR expires_at > now())
)
SELECT * FROM found;

-- name: list_tokens
SELECT name, scopes, instances, created_at, expires_at, revoked_at, last_used_at
FROM tokens ORDER BY name;

-- name: revoke_token
-- Revoking twice keeps the first revocation time.
UPDATE tokens SET revoked_at = coalesce(revoked_at, now())
WHERE name = $1
RETURNING name, revoked_at;
