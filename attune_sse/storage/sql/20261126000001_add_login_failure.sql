-- Failed logins, counted per login and client address over a sliding window, so
-- /auth/login can answer 429 to password guessing. Shared by every worker and
-- instance (an in-process counter would give each worker its own allowance).
-- A success clears its pair; rows older than the window are deleted as new ones come.

CREATE TABLE attune.login_failure (
    login   text        NOT NULL,
    address text        NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failure_pair_idx ON attune.login_failure (login, address, at);
CREATE INDEX login_failure_at_idx ON attune.login_failure (at);
