-- Queries of browser sessions and one-time login codes (app/http/sessions.py, docs/web.md).
-- Session tokens and login codes are random and shown once; only their SHA-256 is stored, so
-- the unique indexes on the hashes are the lookup paths.

-- name: sessions_user_by_token_hash :one
-- The lookup of every request authenticated by the cookie (one index probe on
-- browser_sessions_token_hash_key). An expired session is as good as none.
SELECT s.id AS session_id, s.csrf_token, s.expires_at,
       u.id, u.organization_id, u.name, u.is_admin
FROM browser_sessions s
JOIN users u ON u.id = s.user_id
WHERE s.token_hash = $1
  AND s.expires_at > now();

-- name: sessions_insert :one
-- $4: the lifetime in seconds; the expiry is the database's clock, the one the lookup compares.
INSERT INTO browser_sessions (user_id, token_hash, csrf_token, expires_at)
VALUES ($1, $2, $3, now() + make_interval(secs => $4::double precision))
RETURNING id, expires_at;

-- name: sessions_delete :exec
DELETE FROM browser_sessions WHERE id = $1;

-- name: sessions_delete_expired :exec
-- Run when a session or a login code is created, so dead rows never pile up; each DELETE finds
-- its rows through the expires_at index.
WITH expired_codes AS (
    DELETE FROM browser_login_codes WHERE expires_at <= now()
)
DELETE FROM browser_sessions WHERE expires_at <= now();

-- name: sessions_insert_login_code :one
INSERT INTO browser_login_codes (user_id, code_hash, expires_at)
VALUES ($1, $2, now() + make_interval(secs => $3::double precision))
RETURNING id, expires_at;

-- name: sessions_spend_login_code :one
-- Single use: the code is marked used by the same statement that checks it is unused and
-- unexpired. Of two requests racing with one code, the second waits for the first's row lock,
-- then finds used_at set and gets no row.
WITH spent AS (
    UPDATE browser_login_codes
    SET used_at = now()
    WHERE code_hash = $1
      AND used_at IS NULL
      AND expires_at > now()
    RETURNING user_id
)
SELECT u.id, u.organization_id, u.name, u.is_admin
FROM spent
JOIN users u ON u.id = spent.user_id;
