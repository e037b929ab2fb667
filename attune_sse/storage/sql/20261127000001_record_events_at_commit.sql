-- Events recorded at commit, in commit order, without making writers wait for each other.
--
-- Until now the trigger took an exclusive ordering lock at a transaction's first
-- change of an execution and held it to the end: one transaction left open (a
-- slow executor, a psql session) held up every other execution write.
--
-- Now a deferred constraint trigger writes the event when the transaction
-- commits: it draws the id, writes the event and queues the NOTIFY. No writer
-- waits for another. Ids are drawn in time order, so a missing id below a
-- visible one is a commit still in flight, or a transaction that failed while
-- committing. To tell which, a reader needs to know who might still hold such
-- an id. The trigger draws it inside the INSERT of the event, which has locked
-- attune.execution_event (ROW EXCLUSIVE) before nextval() runs, and nextval()
-- locks the id sequence (ROW EXCLUSIVE) before it hands out a value; both locks
-- are released only when the transaction has ended (its commit visible to all).
-- So a reader never passes a missing id until the transactions that held both
-- locks when it looked have ended (attune_sse/listener.py, record.py): "every
-- event after id N" stays a complete answer, and clients receive ids in order.
-- Both are needed: a role without USAGE on the schema attune can reach the
-- sequence's lock (nextval(oid) locks before it checks privileges, and so does
-- reading pg_sequences) but not the table's, so it cannot stall readers, as any
-- role could with an advisory lock.
--
-- What a transaction open for a long time does now: nothing to anyone else. Its
-- changes are recorded when it commits, each stamped with the commit time;
-- `data.updated` keeps the time of the change. Only this trigger draws ids.
-- A session that runs `SET CONSTRAINTS ALL IMMEDIATE` makes the trigger fire at
-- its change instead: its events then wait for its commit, and so does the
-- delivery of events recorded after them (writers still do not wait).
--
-- `created` is the commit time, taken as the id is drawn, so it grows with the
-- id: pruning by age walks the primary key and needs no index of its own.
-- `bytes` is the payload's size, so a reader bounds a page by bytes without
-- reading the payloads (NULL for events recorded before this migration).

ALTER TABLE attune.execution_event ADD COLUMN bytes integer;
DROP INDEX attune.execution_event_created_idx;

-- STABLE, as to_char is: an IMMUTABLE SQL function around a STABLE body is not
-- inlined, and then PostgreSQL plans it again in every transaction.
CREATE OR REPLACE FUNCTION attune.iso_utc(ts timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')
$$;

CREATE OR REPLACE FUNCTION attune.notify_execution_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
    body     text;
    done     text;
BEGIN
    -- One statement, so the table is locked before the id is drawn (see above);
    -- the payload is built once (MATERIALIZED), with the id in it.
    WITH drawn AS MATERIALIZED (
        SELECT n.id, n.at, json_build_object(
            'entity_type', 'execution',
            'entity_id', NEW.id,
            'event_id', n.id,
            'timestamp', attune.iso_utc(n.at),
            'data', json_build_object(
                'id', NEW.id,
                'status', NEW.status,
                'action_id', NEW.action,
                'action_ref', NEW.action_ref,
                'result', NEW.result,
                'created', attune.iso_utc(NEW.created),
                'updated', attune.iso_utc(NEW.updated)
            )
        ) AS payload
        FROM (SELECT nextval('attune.execution_event_id_seq') AS id, clock_timestamp() AS at) n
    )
    INSERT INTO attune.execution_event (id, execution, created, bytes, payload)
    SELECT id, NEW.id, at, octet_length(payload::text), payload FROM drawn
    RETURNING id, payload::text INTO event_id, body;
    -- NOTIFY refuses payloads of 8000 bytes or more; readers take events from
    -- the record anyway, so a large change rings the bell with its ids only.
    IF octet_length(body) >= 7900 THEN
        body := format('{"entity_type" : "execution", "entity_id" : %s, "event_id" : %s, "truncated" : true}',
                       NEW.id, event_id);
    END IF;
    -- An assignment, not PERFORM: PL/pgSQL evaluates it without starting a query.
    done := pg_notify('attune_notifications', body);
    RETURN NULL;
END;
$$;

-- Ids are drawn in time order only with no values cached per session.
ALTER SEQUENCE attune.execution_event_id_seq CACHE 1;

DROP TRIGGER execution_notify ON attune.execution;
CREATE CONSTRAINT TRIGGER execution_notify
    AFTER INSERT OR UPDATE ON attune.execution
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION attune.notify_execution_change();
