-- Logins are compared as RFC 8265's UsernameCaseMapped profile says (attune_sse/core/logins.py):
-- `Admin`, `admin` in fullwidth letters, and a login typed composed or decomposed are one login.
-- login_key is the login in that form. Its unique index makes a look-alike of any login, also of
-- one stored before (or by another service, in whatever form it was typed), a conflict.
--
-- SQL cannot compute the key (the profile is Unicode tables): the service fills it for the rows
-- without one (store.fill_login_keys), when it starts and before it creates an identity. A login
-- the profile refuses (it holds a space, say) keeps no key; it is found by its exact text.

ALTER TABLE attune.identity ADD COLUMN login_key text;
CREATE UNIQUE INDEX identity_by_login_key ON attune.identity (login_key);
-- The rows still to key, found without a scan (a login that matches none looks for them).
CREATE INDEX identity_unkeyed ON attune.identity (id) WHERE login_key IS NULL;
