-- Usage and spend limits (app/usage.py).

-- name: effective_spend_limit :one
-- The user's own limit wins over the organization default (user_id NULL sorts last).
SELECT limit_micros, period
FROM spend_limits
WHERE organization_id = $1 AND (user_id = $2 OR user_id IS NULL)
ORDER BY user_id NULLS LAST
LIMIT 1;

-- name: spent_since :one
-- Spend of one user in one organization since a period start. chats_org_owner_idx finds the
-- chats, chat_messages_chat_id_idx their messages; created_at filters the period.
SELECT coalesce(sum(m.cost_micros), 0)::bigint
FROM chats c
JOIN chat_messages m ON m.chat_id = c.id
WHERE c.organization_id = $1 AND c.owner_id = $2 AND m.created_at >= $3;

-- name: period_bounds :one
-- Period start and end in UTC, computed by the database so every replica agrees.
SELECT date_trunc($1, now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS starts_at,
       (date_trunc($1, now() AT TIME ZONE 'UTC') + ('1 ' || $1)::interval) AT TIME ZONE 'UTC'
           AS resets_at;
