-- attune-sse's trigger before the commit-time lock (sql/20260119000001): the
-- ordering lock is taken at a transaction's first execution change and held
-- until it ends, so writers of executions run one at a time. Kept here only as
-- the write benchmark's "before".
CREATE FUNCTION attune.bench_previous_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
    payload  json;
    body     text;
BEGIN
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
    INSERT INTO attune.execution_event (id, execution, payload) VALUES (event_id, NEW.id, payload);
    body := payload::text;
    IF octet_length(body) >= 7900 THEN
        body := json_build_object('entity_type', 'execution', 'entity_id', NEW.id,
                                  'event_id', event_id, 'truncated', true)::text;
    END IF;
    PERFORM pg_notify('attune_notifications', body);
    RETURN NEW;
END;
$$;

CREATE TRIGGER bench_previous_notify
    AFTER INSERT OR UPDATE ON attune.execution
    FOR EACH ROW EXECUTE FUNCTION attune.bench_previous_notify();
