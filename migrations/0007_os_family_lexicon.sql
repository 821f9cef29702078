-- REAPI's platform lexicon spells OSFamily in lower case (`linux`), and the server now
-- reads it so on both sides of the match (expbuild/reapi/platforms.py). Rows written before
-- say `Linux`: respell them, or the workers registered before the upgrade would match no
-- new task, and the tasks queued before it no upgraded worker.
UPDATE workers
SET platform = jsonb_set(platform, '{OSFamily}', (
        SELECT jsonb_agg(DISTINCT CASE
            WHEN lower(v) IN ('aix', 'freebsd', 'hpux', 'linux', 'macos', 'netbsd', 'openbsd',
                              'solaris', 'windows') THEN lower(v) ELSE v END)
        FROM jsonb_array_elements_text(platform -> 'OSFamily') AS v))
WHERE jsonb_typeof(platform -> 'OSFamily') = 'array'
  AND EXISTS (SELECT 1 FROM jsonb_array_elements_text(platform -> 'OSFamily') AS v
              WHERE v <> lower(v));

UPDATE tasks
SET platform = jsonb_set(platform, '{OSFamily}', (
        SELECT jsonb_agg(DISTINCT CASE
            WHEN lower(v) IN ('aix', 'freebsd', 'hpux', 'linux', 'macos', 'netbsd', 'openbsd',
                              'solaris', 'windows') THEN lower(v) ELSE v END)
        FROM jsonb_array_elements_text(platform -> 'OSFamily') AS v))
WHERE state IN ('queued', 'leased')  -- a leased task may be queued again
  AND jsonb_typeof(platform -> 'OSFamily') = 'array'
  AND EXISTS (SELECT 1 FROM jsonb_array_elements_text(platform -> 'OSFamily') AS v
              WHERE v <> lower(v));
