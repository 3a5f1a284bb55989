-- NATS credentials issued by `fleet-orchestrator nats-creds` (observers of one tenant). The
-- creds file itself is shown once and never stored; the auth callout admits its holder while
-- the row is live, so revoking the row locks the file out.
CREATE TABLE nats_credentials (
    id          text PRIMARY KEY,
    tenant      text        NOT NULL,
    role        text        NOT NULL CHECK (role IN ('observer')),
    name        text        NOT NULL,
    public_key  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX nats_credentials_tenant ON nats_credentials (tenant, created_at DESC);
