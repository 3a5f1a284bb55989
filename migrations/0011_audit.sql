-- Tamper-evident audit trail (see orchestrator/src/audit.rs for the design).
--
-- Every history row names who caused it: a key id (API calls), a robot id (what a robot
-- reported) or `system` (the sweeper, admission, the offer watchdog). A constant default keeps
-- this a catalogue-only change on a large table.
ALTER TABLE job_history ADD COLUMN actor text NOT NULL DEFAULT 'system';

-- History rows not sealed yet. Filled by the outbox trigger in the writer's own transaction, so
-- a row is here exactly when it committed; `xid` is the writing transaction, which lets the
-- verifier tell a row that committed late (its transaction was running when a later id was
-- sealed) from one inserted afterwards with an old id.
CREATE TABLE audit_queue (
    id  bigint PRIMARY KEY,
    xid xid8   NOT NULL DEFAULT pg_current_xact_id()
);

-- The chain: per tenant, one entry per history row in the order the sealer saw them commit.
-- `hash` = SHA-256 over a canonical encoding of the row, its `xid`, the seal's `horizon` (the
-- first transaction id not yet started when the seal's snapshot was taken) and `prev_hash`.
-- No foreign key to job_history on purpose: a deleted history row must leave its entry behind.
CREATE TABLE audit_chain (
    tenant     text        NOT NULL,
    seq        bigint      NOT NULL,
    history_id bigint      NOT NULL,
    xid        xid8        NOT NULL,
    horizon    xid8        NOT NULL,
    hash       bytea       NOT NULL,
    prev_hash  bytea       NOT NULL,
    sealed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, seq)
);
CREATE UNIQUE INDEX audit_chain_history ON audit_chain (history_id);

-- One trigger call per statement for both queues: the outbox trigger's function now also
-- queues the rows for sealing (a second trigger would double the per-statement overhead).
CREATE OR REPLACE FUNCTION job_history_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_outbox (id) SELECT id FROM new_rows;
    INSERT INTO audit_queue (id) SELECT id FROM new_rows;
    RETURN NULL;
END
$$;

-- Rows written before this migration are sealed too (their actor is unknown: `system`).
INSERT INTO audit_queue (id) SELECT id FROM job_history;
