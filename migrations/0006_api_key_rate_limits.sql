-- A key's own rate limit (`requests` per `period_s` seconds, all of which may come at once), which
-- the gateway applies instead of its global default; NULL: the default. Kept on the key's row, so
-- rotating the key (a new secret on the same row) keeps it.
ALTER TABLE api_keys
    ADD COLUMN rate_limit_requests integer CHECK (rate_limit_requests > 0),
    ADD COLUMN rate_limit_period_s integer CHECK (rate_limit_period_s IN (1, 60, 3600)),
    ADD CONSTRAINT api_keys_rate_limit_whole
        CHECK ((rate_limit_requests IS NULL) = (rate_limit_period_s IS NULL));
