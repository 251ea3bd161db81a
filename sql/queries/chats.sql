-- Queries of the chat state machine as driven by users (app/state/chats.py). Every transition first
-- locks the chat row (chats_lock_for_owner), so transitions of one chat are serialized and the
-- message ids of one chat commit in id order (a safe "after id X" cursor for streams).

-- name: chats_default_model_config :one
-- The partial unique index chat_model_configs_one_default makes this at most one row.
SELECT * FROM chat_model_configs WHERE is_default AND enabled;

-- name: chats_enabled_model_config :one
SELECT * FROM chat_model_configs WHERE id = $1 AND enabled;

-- name: chats_insert :one
-- A chat is born pending with its first message in the same transaction, so it is only
-- visible (and acquirable) once it is durable. $8: an id the client chose (the AI SDK's chat
-- id), or NULL for a new one; an id that is taken inserts nothing (no row comes back).
-- $9: its client tools (a JSON array). $10: the MCP servers it chose (NULL: every enabled one).
INSERT INTO chats (id, owner_id, organization_id, parent_chat_id, root_chat_id, title, status,
                   model_config_id, client_type, client_tools, mcp_server_ids)
VALUES (coalesce($8::uuid, gen_random_uuid()), $1, $2, $3::uuid, coalesce($4::uuid, $3::uuid), $5,
        'pending', $6, $7, $9::jsonb, $10::uuid[])
ON CONFLICT (id) DO NOTHING
RETURNING *;

-- name: chats_set_client_tools :exec
-- A send that names `tools` replaces the chat's client tools, in the send's transaction. A run
-- in progress reads them before each step (runs_step_contexts): its next step is offered them.
UPDATE chats SET client_tools = $2::jsonb WHERE id = $1;

-- name: chats_lock_user_for_limits :exec
-- Serializes the per-user limit checks of one user (max_chats_per_user,
-- max_pending_chats_per_user): two concurrent creates of the same user would otherwise both
-- count N-1 and both pass. The count is a separate, later statement so that its snapshot sees
-- what the previous holder committed. FOR NO KEY UPDATE does not conflict with the FOR KEY SHARE
-- of foreign-key checks, so inserting chats (chats.owner_id) is not blocked by it. Lock order:
-- a transition locks its chat row first, then the user row, never the other way.
SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE;

-- name: chats_count_of_user :one
-- What the per-user limits count: chats not archived, and chats waiting for a replica. Served
-- by chats_owner_created_idx (owner_id first).
SELECT count(*) FILTER (WHERE NOT archived) AS chats,
       count(*) FILTER (WHERE status = 'pending') AS pending
FROM chats
WHERE owner_id = $1;

-- name: chats_lock_for_owner :one
-- FOR UPDATE serializes every transition (and every message insert) of one chat. The owner
-- condition makes another user's chat indistinguishable from a missing one.
SELECT * FROM chats WHERE id = $1 AND owner_id = $2 FOR UPDATE;

-- name: chats_get_for_owner :one
SELECT * FROM chats WHERE id = $1 AND owner_id = $2;

-- name: chats_list_for_owner :many
-- Newest first, paged by the (created_at, id) of the last row of the previous page; served by
-- chats_owner_created_idx. $3/$4 filter when not null.
SELECT * FROM chats
WHERE owner_id = $1
  AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $5::uuid))
  AND ($3::text IS NULL OR status = $3)
  AND ($4::boolean IS NULL OR archived = $4)
ORDER BY created_at DESC, id DESC
LIMIT $6;

-- name: chats_insert_message :one
INSERT INTO chat_messages (chat_id, role, content)
VALUES ($1, $2, $3::jsonb)
RETURNING *;

-- name: chats_make_pending :one
-- waiting/error -> pending: a new user turn. Clears the error and any stale interrupt mark.
UPDATE chats
SET status = 'pending', worker_id = NULL, last_error = NULL, interrupt_requested_at = NULL
WHERE id = $1
RETURNING *;

-- name: chats_count_queued :one
SELECT count(*) FROM chat_queued_messages WHERE chat_id = $1;

-- name: chats_insert_queued :one
INSERT INTO chat_queued_messages (chat_id, content)
VALUES ($1, $2::jsonb)
RETURNING *;

-- name: chats_list_queued :many
-- Queue order: promoted first, then FIFO by id (the same order the worker pops in).
SELECT * FROM chat_queued_messages WHERE chat_id = $1 ORDER BY promoted DESC, id;

-- name: chats_pop_queue_head :one
-- The head of the queue (promoted first, then FIFO: the order chats_list_queued shows and the
-- worker pops in). A message sent to an idle chat whose queue is not empty (left behind by a Stop, or
-- by an error) goes to the tail, and this head is sent instead: what was queued first is
-- answered first.
DELETE FROM chat_queued_messages
WHERE id = (
    SELECT id FROM chat_queued_messages
    WHERE chat_id = $1
    ORDER BY promoted DESC, id
    LIMIT 1
)
RETURNING *;

-- name: chats_queued_exists :one
SELECT 1 FROM chat_queued_messages WHERE id = $1 AND chat_id = $2;

-- name: chats_delete_queued :one
DELETE FROM chat_queued_messages WHERE id = $1 AND chat_id = $2 RETURNING *;

-- name: chats_promote_queued :one
UPDATE chat_queued_messages SET promoted = true WHERE id = $1 AND chat_id = $2 RETURNING *;

-- name: chats_clear_queue :exec
DELETE FROM chat_queued_messages WHERE chat_id = $1;

-- name: chats_interrupt_pending :one
-- A pending chat has no worker yet: Stop takes it straight back to waiting. Acquire locks the
-- row too, so a Stop racing an acquire is serialized with it: either the chat is still pending
-- here, or it is running and the worker gets the mark below.
UPDATE chats
SET status = 'waiting', interrupt_requested_at = NULL
WHERE id = $1
RETURNING *;

-- name: chats_request_interrupt :one
-- A running chat: mark it; the owning worker learns it from the chat row's notification,
-- flushes its partial output and completes the transition to waiting.
UPDATE chats
SET interrupt_requested_at = coalesce(interrupt_requested_at, clock_timestamp())
WHERE id = $1
RETURNING *;

-- name: chats_get_user_message_for_edit :one
SELECT * FROM chat_messages
WHERE id = $1 AND chat_id = $2 AND NOT deleted;

-- name: chats_last_user_message :one
-- The user message the chat's latest turn answers (queued messages are not messages yet).
-- Served by chat_messages_chat_id_idx, read backwards.
SELECT * FROM chat_messages
WHERE chat_id = $1 AND role = 'user' AND NOT deleted
ORDER BY id DESC
LIMIT 1;

-- name: chats_soft_delete_messages_from :exec
-- An edit removes the edited message and everything after it from the visible history.
UPDATE chat_messages SET deleted = true WHERE chat_id = $1 AND id >= $2 AND NOT deleted;

-- name: chats_uncompress_for_deleted_summaries :exec
-- An edit soft-deleted every message from $2 on, compaction summaries included: the messages
-- those summaries had compressed go back into the prompt, or the model would lose them. A
-- summary's part records the id range [first, last] it compressed, and every visible message in
-- that range was compressed by it (app/engine/compaction.py). Served by chat_messages_chat_id_idx.
UPDATE chat_messages m
SET compressed = false
FROM chat_messages s, jsonb_array_elements(s.content) AS part
WHERE s.chat_id = $1 AND s.id >= $2 AND s.deleted AND s.role = 'system'
  AND part ->> 'type' = 'compaction'
  AND m.chat_id = $1 AND m.compressed AND NOT m.deleted
  AND m.id BETWEEN (part -> 'compressed_message_ids' ->> 0)::bigint
               AND (part -> 'compressed_message_ids' ->> 1)::bigint;

-- name: chats_clear_stream_parts :exec
DELETE FROM chat_stream_parts WHERE chat_id = $1;

-- name: chats_reset_to_pending :one
-- Edit: whatever the chat was doing, it starts over from the edited message. Clearing worker_id
-- fences out a run in progress (its writes require status = running and its worker id). The
-- calls a requires_action chat waited for were soft-deleted with the rest of the history: they
-- are dropped.
UPDATE chats
SET status = 'pending', worker_id = NULL, last_error = NULL, interrupt_requested_at = NULL,
    pending_tool_calls = NULL, action_deadline_at = NULL
WHERE id = $1
RETURNING *;

-- name: chats_answer_action :one
-- requires_action -> pending: the client's results were inserted in the same transaction (after
-- the row lock, so the tool message's id follows the step's); any replica continues the turn
-- (chat_wake). Not counted against max_pending_chats_per_user: the turn was already under way.
UPDATE chats
SET status = 'pending', pending_tool_calls = NULL, action_deadline_at = NULL
WHERE id = $1 AND status = 'requires_action'
RETURNING *;

-- name: chats_close_action :one
-- requires_action -> waiting without the client's results (Stop, archive): the pending calls'
-- error results were inserted in the same transaction. The queue is left as it is, as after any
-- Stop.
UPDATE chats
SET status = 'waiting', pending_tool_calls = NULL, action_deadline_at = NULL
WHERE id = $1 AND status = 'requires_action'
RETURNING *;

-- name: chats_update_fields :one
-- PATCH: title and archived, each only when given. Archiving a busy chat stops it: status goes
-- to waiting and worker_id is cleared, which fences out the run in progress.
UPDATE chats
SET title = coalesce($2, title),
    archived = coalesce($3, archived),
    status = CASE WHEN coalesce($3, archived) AND status IN ('pending', 'running')
                  THEN 'waiting' ELSE status END,
    worker_id = CASE WHEN coalesce($3, archived) AND status IN ('pending', 'running')
                     THEN NULL ELSE worker_id END,
    interrupt_requested_at = CASE WHEN coalesce($3, archived) AND status IN ('pending', 'running')
                                  THEN NULL ELSE interrupt_requested_at END
WHERE id = $1
RETURNING *;

-- name: chats_archive_drop_live_parts :exec
-- Archiving stops the chat and its children (chats_update_fields, chats_archive_children): the live
-- parts of their runs in progress are void. They go in the archive transaction, so no client
-- joining afterwards gets them in its snapshot (streams_read also shows live parts only while a
-- chat is running: a part flush that commits after this delete is never shown). Hubs following
-- the step learn it from the status change: `history_reset` with reason `step_discarded`.
DELETE FROM chat_stream_parts
WHERE chat_id = $1
   OR chat_id IN (SELECT id FROM chats WHERE parent_chat_id = $1);

-- name: chats_list_messages :many
-- The visible history after a cursor, in id order (never created_at order).
SELECT * FROM chat_messages
WHERE chat_id = $1 AND id > $2 AND NOT deleted
ORDER BY id
LIMIT $3;

-- name: chats_interrupt_children :exec
-- Stop reaches the children of a chat: pending ones go back to waiting, running ones are
-- marked for their workers (the same two transitions as a user's Stop).
UPDATE chats
SET status = CASE WHEN status = 'pending' THEN 'waiting' ELSE status END,
    interrupt_requested_at = CASE WHEN status = 'running'
                                  THEN coalesce(interrupt_requested_at, clock_timestamp())
                                  ELSE NULL END
WHERE parent_chat_id = $1 AND status IN ('pending', 'running');

-- name: chats_archive_children :exec
-- Archiving a chat archives its children and stops the busy ones (clearing worker_id fences
-- out their runs).
UPDATE chats
SET archived = true,
    status = CASE WHEN status IN ('pending', 'running') THEN 'waiting' ELSE status END,
    worker_id = NULL,
    interrupt_requested_at = NULL
WHERE parent_chat_id = $1 AND NOT archived;

-- name: chats_count_requiring_action :one
-- For /metrics: the chats waiting for their clients' tool results, across all replicas (the
-- partial index chats_action_deadline_idx holds exactly these).
SELECT count(*) FROM chats WHERE status = 'requires_action';
