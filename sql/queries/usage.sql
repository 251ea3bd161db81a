-- Usage and spend limits (app/state/usage.py).

-- name: usage_effective_spend_limit :one
-- The user's own limit wins over the organization default (user_id NULL sorts last).
SELECT limit_micros, period
FROM spend_limits
WHERE organization_id = $1 AND (user_id = $2 OR user_id IS NULL)
ORDER BY user_id NULLS LAST
LIMIT 1;

-- name: usage_spent_since :one
-- Spend of one user in one organization since a period start: the cost of their messages
-- (steps, interrupted steps, compaction summaries) plus the usage no message carries (title
-- requests, failed attempts: chat_usage), the same sum as the chat_spend view. chats_org_owner_idx
-- finds the chats, chat_messages_chat_id_idx and chat_usage_chat_id_idx their rows; created_at
-- filters the period.
SELECT ((SELECT coalesce(sum(m.cost_micros), 0)
        FROM chats c
        JOIN chat_messages m ON m.chat_id = c.id
        WHERE c.organization_id = $1 AND c.owner_id = $2 AND m.created_at >= $3)
     + (SELECT coalesce(sum(u.cost_micros), 0)
        FROM chats c
        JOIN chat_usage u ON u.chat_id = c.id
        WHERE c.organization_id = $1 AND c.owner_id = $2 AND u.created_at >= $3))::bigint;

-- name: usage_period_bounds :one
-- Period start and end in UTC, computed by the database so every replica agrees.
SELECT date_trunc($1, now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS starts_at,
       (date_trunc($1, now() AT TIME ZONE 'UTC') + ('1 ' || $1)::interval) AT TIME ZONE 'UTC'
           AS resets_at;
