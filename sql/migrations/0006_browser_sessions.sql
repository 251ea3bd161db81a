-- 0006: browser sessions and one-time login codes (docs/web.md).
--
-- A browser cannot send a bearer header on an EventSource, so the web page authenticates with a
-- cookie instead. The cookie holds an opaque random token; like API tokens, only its SHA-256 is
-- stored, so a copy of this table logs nobody in. csrf_token is the session's synchronizer token:
-- the page reads it from the API and echoes it in X-CSRF-Token on every request that changes
-- state; it is useless without the cookie, so it is kept as it is.
CREATE TABLE browser_sessions (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash bytea NOT NULL UNIQUE,
    csrf_token text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE INDEX browser_sessions_user_id_idx ON browser_sessions (user_id);
-- Expired sessions are deleted when sessions are created; this index finds them.
CREATE INDEX browser_sessions_expires_at_idx ON browser_sessions (expires_at);

-- One-time login codes: what `chatd serve` prints, with the embedded database, as a URL that
-- logs a browser in with one click. Stored hashed, short-lived, and spent by the first request
-- that presents one (used_at is set in the same statement that checks it).
CREATE TABLE browser_login_codes (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash  bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);

CREATE INDEX browser_login_codes_user_id_idx ON browser_login_codes (user_id);
CREATE INDEX browser_login_codes_expires_at_idx ON browser_login_codes (expires_at);
