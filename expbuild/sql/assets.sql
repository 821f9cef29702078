-- Remote Asset API: known assets (pushed or fetched before) and the fetch record.

-- name: find_asset
-- The newest live asset of this kind that one of the URIs names with exactly these
-- qualifiers, or (when the request has checksum.sri, $5) any asset with that checksum.
-- $6: oldest_content_accepted (NULL: any age).
SELECT uri, digest, expires_at
FROM assets
WHERE instance_name = $1 AND kind = $2
  AND (expires_at IS NULL OR expires_at > now())
  AND ($6::timestamptz IS NULL OR updated_at >= $6)
  AND ((uri = ANY($3::text[]) AND qualifiers = $4::jsonb)
       OR ($5::text IS NOT NULL AND qualifiers ? 'checksum.sri'
           AND qualifiers ->> 'checksum.sri' = $5))
ORDER BY (uri = ANY($3::text[]) AND qualifiers = $4::jsonb) DESC, updated_at DESC
LIMIT 5;

-- name: put_assets
-- One row per URI; a later push or fetch of the same (URI, qualifiers) replaces the digest.
INSERT INTO assets (instance_name, kind, uri, qualifiers, digest, origin, expires_at)
SELECT $1, $2, u, $4::jsonb, $5, $6, $7 FROM unnest($3::text[]) AS u
ON CONFLICT (instance_name, kind, uri, qualifiers) DO UPDATE
    SET digest = excluded.digest, origin = excluded.origin, expires_at = excluded.expires_at,
        updated_at = now();

-- name: forget_asset
-- An asset whose content left the CAS answers nothing any more.
DELETE FROM assets WHERE instance_name = $1 AND kind = $2 AND digest = $3;

-- name: record_fetch
INSERT INTO asset_fetches (
    instance_name, kind, uris, qualifiers, outcome, uri, digest, bytes_downloaded,
    requested_by, tool, tool_invocation_id, error
) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10, $11, $12);

-- name: purge_asset_fetches
-- $1 retention, $2 batch size
DELETE FROM asset_fetches
WHERE id IN (
    SELECT id FROM asset_fetches
    WHERE fetched_at < now() - $1::interval
    ORDER BY fetched_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING id;
