-- A token is bound to the identity it was issued to, not only to its id.
--
-- An id can come back: a restore from a backup, a failover to a replica that
-- was behind, a sequence reset. A token that named only `sub` then spoke for
-- whoever holds the id now. Each identity gets a random key of its own, made
-- when it is created; tokens carry it (claim `key`) and are refused when the
-- identity with their id has another key. Changing the key (UPDATE ... SET
-- token_key = gen_random_uuid()) ends every token of the identity at once.
--
-- Creating an identity now moves the access generation too: a worker that
-- cached "no identity with this id" must not keep that answer for the new one.

ALTER TABLE attune.identity ADD COLUMN token_key uuid NOT NULL DEFAULT gen_random_uuid();

DROP TRIGGER identity_access_changed ON attune.identity;
CREATE TRIGGER identity_access_changed
    AFTER INSERT OR UPDATE OF frozen, token_key OR DELETE OR TRUNCATE ON attune.identity
    FOR EACH STATEMENT EXECUTE FUNCTION attune.bump_access_generation();
