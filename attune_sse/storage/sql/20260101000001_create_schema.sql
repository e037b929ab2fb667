-- The Attune core tables this service needs: identities, packs, actions and executions.
CREATE SCHEMA IF NOT EXISTS attune;

CREATE TYPE attune.execution_status_enum AS ENUM (
    'requested', 'scheduling', 'scheduled', 'running', 'completed',
    'failed', 'canceling', 'cancelled', 'timeout', 'abandoned'
);

-- Every table keeps `updated` true without relying on the application.
CREATE FUNCTION attune.set_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated := now();
    RETURN NEW;
END;
$$;

CREATE TABLE attune.identity (
    id            bigserial PRIMARY KEY,
    login         text NOT NULL UNIQUE CHECK (length(login) BETWEEN 1 AND 255),
    display_name  text,
    password_hash text,
    created       timestamptz NOT NULL DEFAULT now(),
    updated       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE attune.pack (
    id          bigserial PRIMARY KEY,
    ref         text NOT NULL UNIQUE CHECK (ref ~ '^[a-z][a-z0-9_-]+$'),
    label       text NOT NULL,
    description text,
    version     text NOT NULL DEFAULT '0.1.0',
    created     timestamptz NOT NULL DEFAULT now(),
    updated     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE attune.action (
    id          bigserial PRIMARY KEY,
    ref         text NOT NULL UNIQUE CHECK (ref ~ '^[a-z][a-z0-9_-]+\.[A-Za-z0-9_.-]+$'),
    pack        bigint NOT NULL REFERENCES attune.pack (id) ON DELETE CASCADE,
    pack_ref    text NOT NULL,
    label       text NOT NULL,
    description text,
    entrypoint  text NOT NULL DEFAULT '',
    created     timestamptz NOT NULL DEFAULT now(),
    updated     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX action_pack_idx ON attune.action (pack);

CREATE TABLE attune.execution (
    id         bigserial PRIMARY KEY,
    action     bigint REFERENCES attune.action (id) ON DELETE SET NULL,
    action_ref text NOT NULL,
    config     jsonb,
    parent     bigint REFERENCES attune.execution (id) ON DELETE SET NULL,
    executor   bigint REFERENCES attune.identity (id) ON DELETE SET NULL,
    status     attune.execution_status_enum NOT NULL DEFAULT 'requested',
    result     jsonb,
    created    timestamptz NOT NULL DEFAULT now(),
    updated    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX execution_status_idx ON attune.execution (status);
CREATE INDEX execution_action_ref_idx ON attune.execution (action_ref);
CREATE INDEX execution_created_idx ON attune.execution (created DESC);

CREATE TRIGGER identity_updated BEFORE UPDATE ON attune.identity
    FOR EACH ROW EXECUTE FUNCTION attune.set_updated();
CREATE TRIGGER pack_updated BEFORE UPDATE ON attune.pack
    FOR EACH ROW EXECUTE FUNCTION attune.set_updated();
CREATE TRIGGER action_updated BEFORE UPDATE ON attune.action
    FOR EACH ROW EXECUTE FUNCTION attune.set_updated();
CREATE TRIGGER execution_updated BEFORE UPDATE ON attune.execution
    FOR EACH ROW EXECUTE FUNCTION attune.set_updated();
