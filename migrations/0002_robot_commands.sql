-- Desired state of each robot (commands), kept by the orchestrator and mirrored into the
-- `fleet_commands` KV bucket that robots watch.
ALTER TABLE robots
    ADD COLUMN desired_mode     text   NOT NULL DEFAULT 'online',
    ADD COLUMN desired_stop     jsonb,
    ADD COLUMN command_revision bigint NOT NULL DEFAULT 0;
