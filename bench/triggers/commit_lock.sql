-- The alternative attune-sse did not choose: the event written at commit by a
-- deferred trigger, as now, but ordered by an exclusive advisory lock taken
-- there (held through the commit) instead of by the reader's check of the
-- transactions in flight. Simpler readers; the trigger's work is serialised
-- with every other notifying commit. Kept here only for the write benchmark.
CREATE FUNCTION attune.bench_commit_lock_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    event_id  bigint;
    at        timestamptz;
    payload   json;
    body      text;
    body_size integer;
    done      text;
BEGIN
    done := pg_advisory_xact_lock(107152797951350);
    event_id := nextval('attune.execution_event_id_seq');
    at := clock_timestamp();
    payload := json_build_object(
        'entity_type', 'execution',
        'entity_id', NEW.id,
        'event_id', event_id,
        'timestamp', attune.iso_utc(at),
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
    body := payload::text;
    body_size := octet_length(body);
    INSERT INTO attune.execution_event (id, execution, created, bytes, payload)
        VALUES (event_id, NEW.id, at, body_size, payload);
    IF body_size >= 7900 THEN
        body := format('{"entity_type" : "execution", "entity_id" : %s, "event_id" : %s, "truncated" : true}',
                       NEW.id, event_id);
    END IF;
    done := pg_notify('attune_notifications', body);
    RETURN NULL;
END;
$$;
