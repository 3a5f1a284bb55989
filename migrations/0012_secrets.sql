-- Secrets for jobs: a tenant's named values, encrypted at rest (XChaCha20-Poly1305 under the
-- orchestrator's master key, with tenant and name as associated data so a row copied to another
-- tenant or name does not decrypt). The value is never stored in plain text, and never read back
-- over the API: only a claim reply of a job that refers to it carries it.
CREATE TABLE secrets (
    tenant      text        NOT NULL,
    name        text        NOT NULL CHECK (name ~ '^[A-Z0-9_]{1,64}$'),
    nonce       bytea       NOT NULL CHECK (length(nonce) = 24),
    ciphertext  bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);
