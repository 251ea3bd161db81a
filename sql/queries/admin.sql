-- Queries of the operator-facing routes (app/state/admin.py): model configs and the replica list.

-- name: admin_list_model_configs :many
-- The default first, then by creation. $1 = include disabled configs (admins see them all).
SELECT * FROM chat_model_configs
WHERE enabled OR $1
ORDER BY is_default DESC, created_at, id;

-- name: admin_lock_model_config :one
SELECT * FROM chat_model_configs WHERE id = $1 FOR UPDATE;

-- name: admin_clear_default_model_config :exec
-- Making a config the default takes the flag from the previous one in the same transaction; the
-- partial unique index chat_model_configs_one_default rejects a concurrent second default.
UPDATE chat_model_configs
SET is_default = false, updated_at = now()
WHERE is_default AND id IS DISTINCT FROM $1;

-- name: admin_insert_model_config :one
INSERT INTO chat_model_configs (provider, model, display_name, context_limit,
                                compression_threshold, is_default, enabled, options)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)
RETURNING *;

-- name: admin_update_model_config :one
-- PATCH: each column only when given (NULL = unchanged).
UPDATE chat_model_configs
SET provider = coalesce($2, provider),
    model = coalesce($3, model),
    display_name = coalesce($4, display_name),
    context_limit = coalesce($5, context_limit),
    compression_threshold = coalesce($6, compression_threshold),
    is_default = coalesce($7, is_default),
    enabled = coalesce($8, enabled),
    options = coalesce($9::jsonb, options),
    updated_at = now()
WHERE id = $1
RETURNING *;

-- name: admin_delete_model_config :one
-- Fails with a foreign-key violation while any chat or message names the config: the caller
-- answers 409 and the config can be disabled instead.
DELETE FROM chat_model_configs WHERE id = $1 RETURNING id;

-- name: admin_list_replicas :many
-- The operator view chat_replica_health: heartbeat age and running chats per replica.
SELECT id, hostname, pid, address, started_at,
       extract(epoch FROM heartbeat_age)::float8 AS heartbeat_age_s,
       running_chats
FROM chat_replica_health
ORDER BY started_at, id;
