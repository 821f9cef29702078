-- Who may call the server, and who owns what they made (expbuild.auth, docs/security.md).

-- Bearer tokens. Only the SHA-256 of a secret is stored: a leaked table grants nothing.
CREATE TABLE tokens (
    name          text PRIMARY KEY,
    secret_sha256 bytea NOT NULL UNIQUE CHECK (length(secret_sha256) = 32),
    -- cas:read, cas:write, execute, ac:write, worker, admin
    scopes        text[] NOT NULL,
    -- Instance names the token may use; empty: every instance.
    instances     text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    -- Refreshed at most once per replica's cache period, not at every call.
    last_used_at  timestamptz
);

-- The credential (token name, or "cert:<identity>") that registered each worker: only it
-- may register that id again, heartbeat, poll or report results for it. '' with auth off.
ALTER TABLE workers ADD COLUMN principal text NOT NULL DEFAULT '';

-- The credential that created each operation: only it (or an admin) may see, wait on,
-- cancel or delete it. '' with auth off.
ALTER TABLE operations ADD COLUMN principal text NOT NULL DEFAULT '';
CREATE INDEX operations_principal_idx ON operations (principal, created_at DESC);
