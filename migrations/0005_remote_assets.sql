-- Remote Asset API (#12): which URI, with which qualifiers, names which CAS content; and
-- an append-only record of every Fetch call (who asked for which URIs, what answered).

CREATE TABLE assets (
    instance_name text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('blob', 'directory')),
    uri           text NOT NULL,
    -- {"qualifier name": "value", ...}; part of the key, as REAPI asks.
    qualifiers    jsonb NOT NULL,
    digest        text NOT NULL,  -- "<sha256>/<size>"
    origin        text NOT NULL CHECK (origin IN ('push', 'fetch')),
    expires_at    timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_name, kind, uri, qualifiers)
);

-- A request with checksum.sri may be answered by content with that checksum from any URI.
CREATE INDEX assets_sri_idx ON assets (instance_name, kind, (qualifiers ->> 'checksum.sri'))
    WHERE qualifiers ? 'checksum.sri';

CREATE TABLE asset_fetches (
    id                 bigserial PRIMARY KEY,
    fetched_at         timestamptz NOT NULL DEFAULT now(),
    instance_name      text NOT NULL,
    kind               text NOT NULL CHECK (kind IN ('blob', 'directory')),
    uris               text[] NOT NULL,
    qualifiers         jsonb NOT NULL,
    -- cached: answered from a known asset; downloaded: fetched now; failed: see error.
    outcome            text NOT NULL CHECK (outcome IN ('cached', 'downloaded', 'failed')),
    uri                text,    -- the URI that answered
    digest             text,
    bytes_downloaded   bigint,
    -- Who asked: the credential's name when auth is on, else the peer address.
    requested_by       text NOT NULL,
    -- From the caller's RequestMetadata, when it sent one (Bazel does).
    tool               text,
    tool_invocation_id text,
    error              text
);

CREATE INDEX asset_fetches_at_idx ON asset_fetches (fetched_at);
