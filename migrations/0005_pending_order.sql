-- The admission pass reads pending jobs in priority order across tenants; without an index in
-- that order every pass sorted all pending jobs (fleet-bench: thousands per pass under load).
CREATE INDEX jobs_pending_order ON jobs (priority DESC, created_at) WHERE status = 'pending';
