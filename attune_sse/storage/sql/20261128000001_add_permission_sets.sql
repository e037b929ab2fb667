-- Who may see what: permission sets (upstream Attune's shape), their assignment
-- to identities, and identities that can be frozen.
--
-- Every worker keeps what each identity may do in memory, so a request costs
-- no query. It learns of a change from attune.access_generation: every change
-- that can narrow or widen an identity's access (its freeze, its deletion, an
-- assignment, a set's grants) adds one to it, in the changing transaction.
-- The single row is locked until that transaction ends, so the counter moves
-- in commit order, and a worker that reads a new value and then reloads sees
-- the change. Workers read it twice a second (security.access_refresh_seconds).
-- A NOTIFY would be faster, but any role may send one; a poll of one row
-- cannot be forged, and such changes are rare next to execution writes.

ALTER TABLE attune.identity ADD COLUMN frozen boolean NOT NULL DEFAULT false;

CREATE TABLE attune.permission_set (
    id      bigserial PRIMARY KEY,
    ref     text NOT NULL UNIQUE CHECK (ref ~ '^[a-z][a-z0-9_-]+\.[A-Za-z0-9_.-]+$'),
    label   text,
    grants  jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(grants) = 'array'),
    created timestamptz NOT NULL DEFAULT now(),
    updated timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER permission_set_updated BEFORE UPDATE ON attune.permission_set
    FOR EACH ROW EXECUTE FUNCTION attune.set_updated();

CREATE TABLE attune.permission_assignment (
    id             bigserial PRIMARY KEY,
    identity       bigint NOT NULL REFERENCES attune.identity (id) ON DELETE CASCADE,
    permission_set bigint NOT NULL REFERENCES attune.permission_set (id) ON DELETE CASCADE,
    created        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (identity, permission_set)
);
CREATE INDEX permission_assignment_set_idx ON attune.permission_assignment (permission_set);

CREATE TABLE attune.access_generation (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    generation bigint NOT NULL DEFAULT 0
);
INSERT INTO attune.access_generation DEFAULT VALUES;

CREATE FUNCTION attune.bump_access_generation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE attune.access_generation SET generation = generation + 1;
    RETURN NULL;
END;
$$;

-- Statement-level: one bump per statement, however many rows it changed.
CREATE TRIGGER identity_access_changed AFTER UPDATE OF frozen OR DELETE OR TRUNCATE ON attune.identity
    FOR EACH STATEMENT EXECUTE FUNCTION attune.bump_access_generation();
CREATE TRIGGER permission_set_access_changed AFTER UPDATE OF grants OR DELETE OR TRUNCATE ON attune.permission_set
    FOR EACH STATEMENT EXECUTE FUNCTION attune.bump_access_generation();
CREATE TRIGGER permission_assignment_access_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON attune.permission_assignment
    FOR EACH STATEMENT EXECUTE FUNCTION attune.bump_access_generation();
