-- Sub-agents (app/state/subagents.py): child chats of a chat, created and driven by its tools.

-- name: subagents_get_child_chat :one
-- A chat reaches only its own children: the parent condition is the access check.
SELECT * FROM chats WHERE id = $1 AND parent_chat_id = $2;

-- name: subagents_count_open_children :one
-- The sub-agents a chat has open (not closed: close_agent archives), which
-- max_children_per_chat bounds. Run under the parent run's fence (its row locked FOR UPDATE),
-- so two spawns of one parent cannot both pass the check.
SELECT count(*) FROM chats WHERE parent_chat_id = $1 AND NOT archived;

-- name: subagents_last_assistant_text :one
-- The child's answer: the text parts of its newest visible assistant message.
SELECT coalesce(string_agg(part ->> 'text', '' ORDER BY ordinality), '') AS text
FROM (
    SELECT content FROM chat_messages
    WHERE chat_id = $1 AND role = 'assistant' AND NOT deleted
    ORDER BY id DESC
    LIMIT 1
) last_message,
LATERAL jsonb_array_elements(last_message.content) WITH ORDINALITY AS parts(part, ordinality)
WHERE part ->> 'type' = 'text';
