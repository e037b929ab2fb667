-- The seed's trigger, as the original Attune migration wrote it: one JSON
-- payload, one pg_notify, nothing recorded. The write benchmark's reference.
CREATE FUNCTION attune.bench_seed_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    payload json;
BEGIN
    payload := json_build_object(
        'entity_type', 'execution',
        'entity_id', NEW.id,
        'timestamp', now(),
        'data', json_build_object(
            'id', NEW.id,
            'status', NEW.status,
            'action_id', NEW.action,
            'action_ref', NEW.action_ref,
            'result', NEW.result,
            'created', NEW.created,
            'updated', NEW.updated
        )
    );
    PERFORM pg_notify('attune_notifications', payload::text);
    RETURN NEW;
END;
$$;

CREATE TRIGGER bench_seed_notify
    AFTER INSERT OR UPDATE ON attune.execution
    FOR EACH ROW EXECUTE FUNCTION attune.bench_seed_notify();
