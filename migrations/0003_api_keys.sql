-- API keys: only the SHA-256 of each key's secret is stored.
CREATE TABLE api_keys (
    key_id        text PRIMARY KEY,
    tenant        text        NOT NULL,
    name          text        NOT NULL,
    description   text,
    role          text        NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    secret_sha256 text        NOT NULL,
    robot_id      text,
    revoked_at    timestamptz,
    revoke_reason text,
    expires_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    last_used_ip  text
);
CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at DESC);
