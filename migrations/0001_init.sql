-- Fleet's record. The orchestrator applies this at start (sqlx migrations).
--
-- Every job-state write is a compare-and-set on `jobs` that also inserts one `job_history` row in
-- the same statement; `job_history` is the outbox the leader's relay publishes as events.

CREATE TABLE leader_lease (
    id          int PRIMARY KEY CHECK (id = 1),
    holder      uuid,
    epoch       bigint      NOT NULL DEFAULT 0,
    expires_at  timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO leader_lease (id) VALUES (1);

CREATE TABLE robots (
    tenant          text        NOT NULL,
    robot_id        text        NOT NULL,
    name            text        NOT NULL,
    hostname        text        NOT NULL DEFAULT '',
    environment     text        NOT NULL DEFAULT '',
    capabilities    text[]      NOT NULL DEFAULT '{}',
    tags            text[]      NOT NULL DEFAULT '{}',
    max_jobs        int         NOT NULL DEFAULT 1,
    session_id      uuid,
    state_dir_id    text        NOT NULL DEFAULT '',
    run_state       text        NOT NULL DEFAULT 'online',
    online          boolean     NOT NULL DEFAULT false,
    cpu_percent     real,
    memory_mb       double precision,
    version         text,
    last_heartbeat  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, robot_id)
);

CREATE TABLE jobs (
    job_id            uuid PRIMARY KEY,
    tenant            text        NOT NULL,
    workflow_id       text        NOT NULL,
    workflow_name     text        NOT NULL,
    format            text        NOT NULL,
    -- `json`, not `jsonb`: the workflow goes back to robots exactly as submitted (key order too).
    workflow          json        NOT NULL,
    variables         jsonb       NOT NULL DEFAULT '{}',
    metadata          jsonb       NOT NULL DEFAULT '{}',
    requires          text[]      NOT NULL DEFAULT '{}',
    priority          smallint    NOT NULL DEFAULT 10,
    trigger_type      text        NOT NULL DEFAULT 'manual',
    execution_mode    text        NOT NULL DEFAULT 'lan',
    target_robot_id   text,
    timeout_s         bigint,
    status            text        NOT NULL,
    waiting_reason    text,
    -- The current offer: its number (fencing token of claims), where it went, its stream sequence.
    offer_no          int         NOT NULL DEFAULT 0,
    offer_subject     text,
    offer_seq         bigint,
    offered_at        timestamptz,
    -- The current attempt (fencing token of renewals and completions).
    attempt           int         NOT NULL DEFAULT 0,
    max_attempts      int         NOT NULL DEFAULT 3,
    robot_id          text,
    session_id        uuid,
    lease_until       timestamptz,
    cancel_requested  boolean     NOT NULL DEFAULT false,
    progress          smallint    NOT NULL DEFAULT 0,
    current_node      text,
    output            jsonb,
    error_message     text,
    error_type        text,
    rejections        jsonb       NOT NULL DEFAULT '[]',
    request_id        uuid,
    idempotency_key   text,
    history_seq       int         NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    claimed_at        timestamptz,
    started_at        timestamptz,
    completed_at      timestamptz
);

CREATE INDEX jobs_pending ON jobs (tenant, priority DESC, created_at) WHERE status = 'pending';
CREATE INDEX jobs_running_lease ON jobs (lease_until) WHERE status = 'running';
CREATE INDEX jobs_queued_offered ON jobs (offered_at) WHERE status = 'queued';
CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at DESC);
CREATE INDEX jobs_tenant_robot ON jobs (tenant, robot_id) WHERE status = 'running';
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE job_history (
    id           bigserial PRIMARY KEY,
    tenant       text        NOT NULL,
    job_id       uuid,
    robot_id     text,
    seq          int,
    kind         text        NOT NULL,
    attempt      int,
    data         jsonb       NOT NULL DEFAULT '{}',
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    published    boolean     NOT NULL DEFAULT false
);

CREATE INDEX job_history_unpublished ON job_history (id) WHERE NOT published;
CREATE UNIQUE INDEX job_history_job_seq ON job_history (job_id, seq) WHERE job_id IS NOT NULL;
