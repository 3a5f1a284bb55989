-- The activity feed reads a tenant's newest history rows.
CREATE INDEX job_history_tenant_recent ON job_history (tenant, occurred_at DESC, id DESC);
