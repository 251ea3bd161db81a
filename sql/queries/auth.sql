-- Queries of users and API tokens (app/http/auth.py). A token is random and shown once; only its
-- SHA-256 is stored, so the unique index on api_tokens.token_hash is the lookup path of every
-- authenticated request.

-- name: auth_user_by_token_hash :one
-- The lookup of every authenticated request (one index probe on api_tokens_token_hash_key).
-- last_used_at is refreshed at most once a minute, so a stream of requests does not turn into a
-- stream of writes; SKIP LOCKED lets a thousand clients connecting at once with one token skip
-- the row that the first of them is touching instead of queueing behind its lock.
WITH touched AS (
    UPDATE api_tokens
    SET last_used_at = now()
    WHERE id = (
        SELECT id FROM api_tokens
        WHERE token_hash = $1
          AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
        FOR UPDATE SKIP LOCKED
    )
)
SELECT u.id, u.organization_id, u.name, u.is_admin
FROM api_tokens t
JOIN users u ON u.id = t.user_id
WHERE t.token_hash = $1;

-- name: auth_upsert_user :one
-- `chatd token create USER [--admin]`: the user is created in the default organization when new;
-- --admin promotes an existing user, its absence never demotes one.
INSERT INTO users (name, is_admin)
VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET is_admin = users.is_admin OR EXCLUDED.is_admin
RETURNING *;

-- name: auth_insert_token :one
INSERT INTO api_tokens (user_id, token_hash)
VALUES ($1, $2)
RETURNING id, created_at;
