-- Robot keys (issue 12): a `robot` role outside the user roles, the capabilities a robot key
-- grants (NULL: not restricted), and the binding of a robot to the key it enrolled with, which
-- records what it offered, what the key granted and what it may therefore claim (effective).
ALTER TABLE api_keys DROP CONSTRAINT api_keys_role_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_role_check
    CHECK (role IN ('viewer', 'operator', 'admin', 'robot'));
ALTER TABLE api_keys ADD COLUMN capabilities text[];

-- One row per robot bound to a key. The robot row may not exist yet (a binding is made when the
-- robot connects, before it registers), so this is its own table rather than robot columns.
-- `revoked_at` is set once the key stopped working (revoked, expired, deleted) and the robot was
-- taken offline; a revoked binding refuses registration, claims and heartbeats.
CREATE TABLE robot_bindings (
    tenant      text        NOT NULL,
    robot_id    text        NOT NULL,
    key_id      text        NOT NULL,
    offered     text[]      NOT NULL DEFAULT '{}',
    granted     text[],
    effective   text[]      NOT NULL DEFAULT '{}',
    bound_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    PRIMARY KEY (tenant, robot_id)
);
CREATE INDEX robot_bindings_key ON robot_bindings (key_id);
