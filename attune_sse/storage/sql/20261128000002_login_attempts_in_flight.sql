-- A login attempt is recorded before its password is checked (pending), so that
-- concurrent guesses are counted before any of them is checked: of any number
-- sent at once, at most security.login_max_failures are checked. A pending row
-- becomes a failure if the password was wrong, and is deleted if it was right;
-- one left pending by a worker that died counts as a failure after 30 s.
ALTER TABLE attune.login_failure
    ADD COLUMN id bigserial PRIMARY KEY,
    ADD COLUMN pending boolean NOT NULL DEFAULT false;
