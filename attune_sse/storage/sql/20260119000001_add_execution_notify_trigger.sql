-- Every INSERT or UPDATE of an execution is recorded as an event and announced
-- with NOTIFY on the channel `attune_notifications`.
--
-- The event row is written in the same transaction as the change, so the record
-- and the notification can never disagree. Its id is the SSE `id:` field.
--
-- Event ids follow commit order. A sequence alone hands out ids at INSERT, and
-- transactions may commit in another order, so a reader that has seen id 11
-- could later find a committed id 10 and skip it on resume. The trigger takes a
-- transaction-scoped advisory lock before it draws the id: a second writer waits
-- there until the first commits or rolls back. So at any moment the committed
-- events are a prefix of the id order (less ids of rolled-back transactions), and
-- "everything after id N" is a complete answer. The cost: writes to executions
-- serialise from their first event until commit; keep those transactions short.
-- The payload is kept as `json` (not `jsonb`) so the text a client receives is
-- byte for byte the text stored, with the seed's key order.

CREATE TABLE attune.execution_event (
    id        bigserial PRIMARY KEY,
    execution bigint NOT NULL,
    created   timestamptz NOT NULL DEFAULT now(),
    payload   json NOT NULL
);
CREATE INDEX execution_event_execution_idx ON attune.execution_event (execution, id);
CREATE INDEX execution_event_created_idx ON attune.execution_event (created);

-- Pruning deletes old events; the highest id it removed is kept here, so a client
-- that resumes from before it is told it missed events, rather than nothing.
CREATE TABLE attune.execution_event_horizon (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_to  bigint NOT NULL DEFAULT 0,
    updated    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO attune.execution_event_horizon DEFAULT VALUES;

CREATE FUNCTION attune.iso_utc(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')
$$;

CREATE FUNCTION attune.notify_execution_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
    payload  json;
    body     text;
BEGIN
    -- 0x61747475_6576 ("attuev"): the lock that orders events; see above.
    PERFORM pg_advisory_xact_lock(107152797951350);
    event_id := nextval(pg_get_serial_sequence('attune.execution_event', 'id'));
    payload := json_build_object(
        'entity_type', 'execution',
        'entity_id', NEW.id,
        'event_id', event_id,
        'timestamp', attune.iso_utc(clock_timestamp()),
        'data', json_build_object(
            'id', NEW.id,
            'status', NEW.status,
            'action_id', NEW.action,
            'action_ref', NEW.action_ref,
            'result', NEW.result,
            'created', attune.iso_utc(NEW.created),
            'updated', attune.iso_utc(NEW.updated)
        )
    );
    INSERT INTO attune.execution_event (id, execution, payload)
        VALUES (event_id, NEW.id, payload);

    body := payload::text;
    -- NOTIFY refuses payloads of 8000 bytes or more; a large change rings the
    -- bell with its event id and the listener reads the whole event from the table.
    IF octet_length(body) >= 7900 THEN
        body := json_build_object(
            'entity_type', 'execution',
            'entity_id', NEW.id,
            'event_id', event_id,
            'truncated', true
        )::text;
    END IF;
    PERFORM pg_notify('attune_notifications', body);
    RETURN NEW;
END;
$$;

CREATE TRIGGER execution_notify
    AFTER INSERT OR UPDATE ON attune.execution
    FOR EACH ROW EXECUTE FUNCTION attune.notify_execution_change();
