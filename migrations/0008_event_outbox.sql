-- The event relay's outbox as its own small table instead of a `published` flag on
-- job_history. Marking a history row published rewrote the whole row (its JSON data included)
-- and added three index entries, four times per job; now each history row leaves its id here
-- (a statement-level trigger, so every statement that writes history is covered) and the relay
-- deletes the ids it published.
CREATE TABLE event_outbox (
    id bigint PRIMARY KEY
);

CREATE FUNCTION job_history_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_outbox (id) SELECT id FROM new_rows;
    RETURN NULL;
END
$$;

CREATE TRIGGER job_history_outbox AFTER INSERT ON job_history
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION job_history_outbox();

INSERT INTO event_outbox (id) SELECT id FROM job_history WHERE NOT published;
DROP INDEX job_history_unpublished;
-- Kept for readers of older versions; no longer maintained.
ALTER TABLE job_history ALTER COLUMN published SET DEFAULT true;
UPDATE job_history SET published = true WHERE NOT published;
