-- Queries of the worker's side of the chat state machine (app/state/runs.py). A run is fenced by
-- (worker_id, generation): every write of a run first locks the chat row with runs_lock_owned,
-- and a run whose row no longer says "running, worker_id = me, generation = g" writes nothing.
-- Locking the row first also serializes message inserts of one chat, so its message ids
-- commit in id order (the cursor of every stream).

-- name: runs_acquire :many
-- pending -> running for up to $2 chats in one statement, FAIR across users: no user may run
-- more than $3 chats at once (max_running_chats_per_user), and the slots go round-robin over
-- the users who wait, fewest running chats first. Each pending chat gets the rank
-- `running_after`: the number of chats its owner would run once it and the owner's older
-- pending chats are taken (running + its place in the owner's queue, oldest first); chats are
-- taken by that rank, then oldest first. So a user who queued 200 chats gets one slot, then
-- every other waiting user gets one, then the first user a second, and so on; a user with
-- running chats comes after those with fewer. FIFO by updated_at, as before, let one user's
-- flood starve everyone behind it.
--
-- Cost: one pass over the pending chats (the partial index chats_pending_idx, which holds
-- only them: at most users x max_pending_chats_per_user rows, plus a sort of them by owner)
-- and one over the running chats (the partial index chats_running_worker_idx: at most the
-- replicas' total capacity), whatever the size of the table. Unlike FIFO's LIMIT on the index,
-- it grows with the backlog: measured ~5 ms with 2,000 pending chats, ~25 ms with 10,000
-- (FIFO: ~1 ms). An index (owner_id, updated_at, id) WHERE status = 'pending' would make it an
-- index-only pass with no sort (it needs a migration).
--
-- SKIP LOCKED: replicas acquiring at the same time take disjoint sets instead of queueing
-- behind each other, and a chat locked by a user's transition right now is simply left for the
-- next attempt. The lock is at the outer level, below LIMIT, so a skipped chat does not count
-- and the next candidate is taken instead. The generation bump makes (worker_id, generation) a
-- token no earlier run of the chat holds.
--
-- The cap across replicas: concurrent acquirers compute each user's window (the oldest
-- $3 - running pending chats) over the same queue; SKIP LOCKED gives each chat of the window
-- to one of them and the re-check of status = 'pending' on the locked row drops a chat another
-- acquirer already took, so together they never take more than the window, and a window
-- computed before another acquirer's commit contains the chats that acquirer took. The cap can
-- be passed only when a user's queue ORDER changes between the snapshots of concurrent acquire
-- statements (a pending chat edited or retitled moves to the tail during the milliseconds of
-- an acquire): by at most one chat per concurrent acquirer for each such change.
--
-- Returns the acquired rows and `held_back` on each: whether some pending chat was left only
-- because its owner is at the cap. No chat_wake says when a slot of that owner frees, so a
-- replica that saw held_back acquires again when one of its runs ends. With nothing acquired,
-- one row of NULLs carries held_back (the caller skips it).
WITH running AS (
    SELECT owner_id, count(*) AS running
    FROM chats
    WHERE status = 'running'
    GROUP BY owner_id
), ranked AS (
    SELECT p.id, p.updated_at,
           coalesce(r.running, 0)
               + row_number() OVER (PARTITION BY p.owner_id ORDER BY p.updated_at, p.id)
               AS running_after
    FROM chats p
    LEFT JOIN running r ON r.owner_id = p.owner_id
    WHERE p.status = 'pending'
), eligible AS (
    -- The best few first (a top-N sort, and no join back for the others). The slack covers
    -- chats that replicas acquiring at the same instant lock first.
    SELECT id, running_after, updated_at
    FROM ranked
    WHERE running_after <= $3
    ORDER BY running_after, updated_at, id
    LIMIT 4 * $2 + 64
), candidates AS (
    SELECT c.id, q.updated_at AS pending_since
    FROM eligible q
    JOIN chats c ON c.id = q.id
    WHERE c.status = 'pending'
    ORDER BY q.running_after, q.updated_at, q.id
    LIMIT $2
    FOR UPDATE OF c SKIP LOCKED
), acquired AS (
    UPDATE chats c
    SET status = 'running',
        worker_id = $1,
        generation = c.generation + 1,
        started_at = clock_timestamp(),
        heartbeat_at = clock_timestamp(),
        last_error = NULL
    FROM candidates
    WHERE c.id = candidates.id
    -- How long it waited, for chatd_acquire_latency_seconds: since its last change while
    -- pending (the trigger stamps updated_at), which is normally when it became pending.
    RETURNING c.*, extract(epoch FROM c.started_at - candidates.pending_since)::float8 AS pending_s
)
SELECT a.*, EXISTS (SELECT 1 FROM ranked WHERE running_after > $3) AS held_back
FROM (SELECT) AS one
LEFT JOIN acquired a ON true;

-- name: runs_lock_owned :one
-- The fence. Every write transaction of a run starts here; no row means the run lost its chat
-- (edited, archived, requeued after its replica was declared dead, re-acquired) and the caller
-- raises FencedOut without writing anything else.
SELECT * FROM chats
WHERE id = $1 AND worker_id = $2 AND generation = $3 AND status = 'running'
FOR UPDATE;

-- name: runs_read_chat :one
-- An unlocked read of the row: a run's ownership check after every listener resync.
SELECT * FROM chats WHERE id = $1;

-- name: runs_step_contexts :many
-- Everything a model step starts from, for every chat in $1, in ONE statement (the runs of a
-- replica that start or go on together share it, app/engine/context_reader.py): the chat row
-- (on a run's first step it is the ownership check after subscribing to the chat's channel; on
-- later steps a fresh observation), its model config (or the default one when it names none),
-- the prompt (the visible, uncompressed history in id order, chat_messages_chat_id_idx), the
-- client tools (a send may replace them while the chat runs; the next step is offered the new
-- ones) and the enabled MCP servers it uses (those it chose at creation, or every enabled one
-- when it chose none), by name. A chat that is gone has no row.
SELECT c.id, c AS chat,
       (SELECT m FROM chat_model_configs m
        WHERE m.id = c.model_config_id OR (c.model_config_id IS NULL AND m.is_default)
        ORDER BY m.is_default DESC
        LIMIT 1) AS model_config,
       ARRAY(SELECT m FROM chat_messages m
             WHERE m.chat_id = c.id AND NOT m.deleted AND NOT m.compressed
             ORDER BY m.id) AS messages,
       c.client_tools,
       ARRAY(SELECT s FROM mcp_servers s
             WHERE s.enabled AND (c.mcp_server_ids IS NULL OR s.id = ANY (c.mcp_server_ids))
             ORDER BY s.name) AS mcp_servers
FROM chats c
WHERE c.id = ANY ($1::uuid[]);

-- name: runs_prompt_messages :many
-- What the model sees after a compaction rewrote it: the visible, uncompressed history in id
-- order (chat_messages_chat_id_idx).
SELECT * FROM chat_messages
WHERE chat_id = $1 AND NOT deleted AND NOT compressed
ORDER BY id;

-- name: runs_insert_messages :many
-- A step's messages (the assistant's, then the tool results') in ONE statement: the statement-
-- level trigger sends one "message" notification for the step. WITH ORDINALITY + ORDER BY make
-- the ids follow the array order.
INSERT INTO chat_messages (chat_id, role, content, model_config_id, input_tokens, output_tokens,
                           cache_read_tokens, cache_write_tokens, cost_micros)
SELECT $1, m.role, m.content::jsonb, $2, m.input_tokens, m.output_tokens, m.cache_read_tokens,
       m.cache_write_tokens, m.cost_micros
FROM unnest($3::text[], $4::text[], $5::int[], $6::int[], $7::int[], $8::int[], $9::bigint[])
     WITH ORDINALITY AS m(role, content, input_tokens, output_tokens, cache_read_tokens,
                          cache_write_tokens, cost_micros, n)
ORDER BY m.n
RETURNING *;

-- name: runs_lock_owned_many :many
-- The fence of a group commit (app/engine/group_commit.py): the rows of every run in the batch,
-- given as (chat id $1, worker $2, generation $3) triples, locked in id order (batches of two
-- replicas, and a batch and a user's transaction, never wait on each other in a circle). A run
-- whose row is not returned lost its chat, exactly as with runs_lock_owned; the others go on.
SELECT c.*
FROM chats c
JOIN unnest($1::uuid[], $2::uuid[], $3::bigint[]) AS t(id, worker_id, generation)
  ON c.id = t.id AND c.worker_id = t.worker_id AND c.generation = t.generation
WHERE c.status = 'running'
ORDER BY c.id
FOR UPDATE OF c;

-- name: runs_write_steps :many
-- The step writes of several runs, in ONE statement after their rows were locked by an earlier
-- statement of the same transaction (runs_lock_owned or runs_lock_owned_many). The lock is a
-- statement of its own on purpose: this statement's snapshot then includes every transaction
-- that held a row before us (e.g. a message queued just before the lock was granted); one
-- statement that locked and read at once would miss it.
-- One write per chat: $1 chat, $2 model config of its step, $3 whether it ends the turn, $4 the
-- run was interrupted. The steps' messages, flattened: $5 the (1-based) write each belongs to,
-- $6..$12 role, content, input/output/cache-read/cache-write tokens, cost, in order.
-- For every write:
--   - the chat's live parts are deleted (a reader sees either the parts or the messages);
--   - a write that ends the turn pops the queue's head (promoted first, then FIFO); after a
--     Stop (the run was interrupted, or the mark is on the row) only a promoted message may
--     continue the run;
--   - the step's messages and the popped message become messages in ONE insert for all chats,
--     each chat's in its order (ids follow ORDER BY; the statement-level trigger sends one
--     "message" notification per chat, carrying its highest id);
--   - the turn ended with nothing popped: -> waiting, worker_id and the Stop mark cleared; popped
--     after a Stop mark: the mark is cleared, the chat runs on; popped without one, or a step
--     that does not end the turn: the row is not touched (no version bump, no notification),
--     unless the poison-chat guard's count must start again (the run made progress).
-- Returns, per write in order: the chat id, the row as updated (NULL when untouched), the
-- step's messages and the popped message as inserted.
WITH writes AS (
    SELECT w.chat_id, w.model_config_id, w.ends_turn, w.interrupted, w.n,
           c.interrupt_requested_at IS NOT NULL AS marked
    FROM unnest($1::uuid[], $2::uuid[], $3::bool[], $4::bool[])
         WITH ORDINALITY AS w(chat_id, model_config_id, ends_turn, interrupted, n)
    JOIN chats c ON c.id = w.chat_id
), deleted_parts AS (
    DELETE FROM chat_stream_parts p USING writes w WHERE p.chat_id = w.chat_id
), popped AS (
    DELETE FROM chat_queued_messages
    WHERE id IN (
        SELECT DISTINCT ON (q.chat_id) q.id
        FROM chat_queued_messages q
        JOIN writes w ON w.chat_id = q.chat_id
        WHERE w.ends_turn AND (q.promoted OR NOT (w.marked OR w.interrupted))
        ORDER BY q.chat_id, q.promoted DESC, q.id
    )
    RETURNING chat_id, content
), inserted AS (
    INSERT INTO chat_messages (chat_id, role, content, model_config_id, input_tokens,
                               output_tokens, cache_read_tokens, cache_write_tokens, cost_micros)
    SELECT m.chat_id, m.role, m.content, m.model_config_id, m.input_tokens, m.output_tokens,
           m.cache_read_tokens, m.cache_write_tokens, m.cost_micros
    FROM (
        SELECT w.chat_id, s.role, s.content::jsonb AS content, w.model_config_id,
               s.input_tokens, s.output_tokens, s.cache_read_tokens, s.cache_write_tokens,
               s.cost_micros, w.n AS write_n, s.n
        FROM unnest($5::int[], $6::text[], $7::text[], $8::int[], $9::int[], $10::int[],
                    $11::int[], $12::bigint[])
             WITH ORDINALITY AS s(write_n, role, content, input_tokens, output_tokens,
                                  cache_read_tokens, cache_write_tokens, cost_micros, n)
        JOIN writes w ON w.n = s.write_n
        UNION ALL
        SELECT p.chat_id, 'user', p.content, NULL, 0, 0, 0, 0, 0, w.n, 9223372036854775807
        FROM popped p
        JOIN writes w ON w.chat_id = p.chat_id
    ) m
    ORDER BY m.write_n, m.n
    RETURNING *
), outcomes AS (
    SELECT w.chat_id, w.ends_turn,
           EXISTS (SELECT 1 FROM popped p WHERE p.chat_id = w.chat_id) AS popped
    FROM writes w
), updated AS (
    UPDATE chats c
    SET status = CASE WHEN o.ends_turn AND NOT o.popped THEN 'waiting' ELSE c.status END,
        worker_id = CASE WHEN o.ends_turn AND NOT o.popped THEN NULL ELSE c.worker_id END,
        interrupt_requested_at = CASE WHEN o.ends_turn THEN NULL
                                      ELSE c.interrupt_requested_at END,
        heartbeat_at = CASE WHEN o.ends_turn AND o.popped THEN clock_timestamp()
                            ELSE c.heartbeat_at END,
        failed_runs = 0
    FROM outcomes o
    WHERE c.id = o.chat_id
      AND ((o.ends_turn AND (NOT o.popped OR c.interrupt_requested_at IS NOT NULL))
           OR c.failed_runs <> 0)
    RETURNING c.*
)
SELECT w.chat_id,
       (SELECT u::chats FROM updated u WHERE u.id = w.chat_id) AS chat,
       ARRAY(SELECT i::chat_messages FROM inserted i
             WHERE i.chat_id = w.chat_id AND i.role <> 'user' ORDER BY i.id) AS messages,
       (SELECT i::chat_messages FROM inserted i
        WHERE i.chat_id = w.chat_id AND i.role = 'user') AS next_message
FROM writes w
ORDER BY w.n;

-- name: runs_delete_parts :exec
-- All live parts of the chat: those of the step being persisted (or voided) and any orphan of an
-- earlier generation. Sends no notification; the message notification of the same transaction
-- tells readers the step became durable.
DELETE FROM chat_stream_parts WHERE chat_id = $1;

-- name: runs_insert_control_part :one
-- A control part (today: a retry notice) written directly, not through the flusher, because it
-- must commit after the deletion of the step's void parts in the same transaction.
INSERT INTO chat_stream_parts (chat_id, generation, message_role, part)
VALUES ($1, $2, $3, $4::jsonb)
RETURNING id;

-- name: runs_pop_queue_head :one
-- The head of the queue: promoted first, then FIFO (the order chats_list_queued shows). $2 = true
-- pops only a promoted message (after an interrupt only a promoted message may continue the run).
DELETE FROM chat_queued_messages
WHERE id = (
    SELECT id FROM chat_queued_messages
    WHERE chat_id = $1 AND (promoted OR NOT $2)
    ORDER BY promoted DESC, id
    LIMIT 1
)
RETURNING *;

-- name: runs_insert_user_message :one
INSERT INTO chat_messages (chat_id, role, content)
VALUES ($1, 'user', $2::jsonb)
RETURNING *;

-- name: runs_release :one
-- The run gives the chat up: $2 is 'waiting' (end of a turn, an honoured Stop) or 'pending'
-- (graceful shutdown, lost liveness, a dead replica's chat: another replica continues it).
-- Clearing worker_id ends the ownership, as the chats_running_has_worker check demands. $3 is
-- 1 when the run failed without progress (it crashed, or its replica died): the poison-chat
-- guard's count; 0 for a give-back that says nothing about the chat (shutdown, an outage).
UPDATE chats
SET status = $2, worker_id = NULL, interrupt_requested_at = NULL,
    failed_runs = failed_runs + $3::int
WHERE id = $1
RETURNING *;

-- name: runs_fail :one
-- A terminal provider error, or the poison-chat guard: running -> error with the classified
-- error. The guard's count starts again: a new user message makes the chat pending again
-- (chats_make_pending clears last_error) with the full number of attempts.
UPDATE chats
SET status = 'error', worker_id = NULL, interrupt_requested_at = NULL, last_error = $2::jsonb,
    failed_runs = 0
WHERE id = $1
RETURNING *;

-- name: runs_reset_failed_runs :exec
-- The run made progress (a step persisted, a turn ended): the poison-chat guard's count starts
-- again. Only run when the locked row's count is not zero, so an ordinary step never touches
-- (or bumps the version of) the chat row.
UPDATE chats SET failed_runs = 0 WHERE id = $1 AND failed_runs <> 0;

-- name: runs_record_usage :exec
-- Usage that has no message of its own (a title request, an attempt that failed after the
-- provider reported usage): one row of the chat_usage ledger, summed with the messages' usage
-- by the chat_spend view and by spend limits (usage_spent_since). Not fenced: the call was made and
-- paid for whoever owns the chat now.
INSERT INTO chat_usage (chat_id, kind, model_config_id, input_tokens, output_tokens,
                        cache_read_tokens, cache_write_tokens, cost_micros)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8);

-- name: runs_lock_orphans :many
-- Running chats whose replica is gone (with the poison-chat guard's count: a replica that died
-- while running a chat counts as a failed run of it): named in $1 (its advisory lock was free or its heartbeat
-- stale, and its row was just deleted), or with no replica row at all for longer than $2
-- seconds (a replica that acquired after it had already been declared dead). Locked in id
-- order; replicas sweeping at the same time queue here and then skip what the first one
-- already moved (the row no longer matches), so each chat is requeued once. Served by
-- chats_running_worker_idx.
--
-- A run that began before the server's last start died with the server (a restart or a crash
-- ends every session, and with it every replica's lock): that is an outage, which says nothing
-- about the chat, so it does not count toward the guard (`counts`).
SELECT c.id, c.interrupt_requested_at IS NOT NULL AS stop_requested, c.failed_runs,
       coalesce(c.started_at > pg_postmaster_start_time(), true) AS counts
FROM chats c
WHERE c.status = 'running'
  AND (c.worker_id = ANY($1::uuid[])
       OR (NOT EXISTS (SELECT 1 FROM chat_replicas r WHERE r.id = c.worker_id)
           AND c.started_at < clock_timestamp() - make_interval(secs => $2)))
ORDER BY c.id
FOR UPDATE;

-- name: runs_delete_parts_of :exec
DELETE FROM chat_stream_parts WHERE chat_id = ANY($1::uuid[]);

-- name: runs_compress_messages :exec
-- Compaction, inside the fenced transaction that also inserts the summary: the summarized
-- messages leave the prompt (runs_prompt_messages skips them) but stay in the user's history.
-- Only visible, not yet compressed rows of this chat; sends no notification (the update
-- trigger speaks only of soft deletes), the summary's insert sends the "message" one.
UPDATE chat_messages SET compressed = true
WHERE chat_id = $1 AND id = ANY($2::bigint[]) AND NOT deleted AND NOT compressed;

-- name: runs_set_generated_title :one
-- A generated title replaces the fallback only while the fallback is still there ($2): a title
-- the user set meanwhile wins. Not fenced: a title is metadata, not state of the run, and may
-- land after the run released the chat. Returns nothing when the title had changed.
UPDATE chats SET title = $3
WHERE id = $1 AND title = $2
RETURNING *;

-- name: runs_lock_unrun :many
-- Running chats that the table assigns to replica $1 but that none of its live runs, given as
-- (chat id $2, generation $3) pairs, drives: an acquire whose answer was lost with its
-- connection (the UPDATE committed, the replica never saw the rows), or a run that ended
-- without being able to release its chat. Locked like runs_lock_orphans; served by
-- chats_running_worker_idx.
SELECT c.id, c.interrupt_requested_at IS NOT NULL AS stop_requested
FROM chats c
WHERE c.status = 'running'
  AND c.worker_id = $1
  AND (c.id, c.generation) NOT IN (SELECT * FROM unnest($2::uuid[], $3::bigint[]))
ORDER BY c.id
FOR UPDATE;

-- name: runs_require_action :one
-- The model called client tools: after runs_lock_owned and runs_persist_step in the same
-- transaction (the step, with the results of its server-side calls, is durable), the run ends
-- and gives its slot up (worker_id cleared, which also fences anything the run might still
-- try). $2 the pending calls [{id, name, args}], $3 seconds until the replicas stop waiting for
-- the client (requires_action_timeout_s). A Stop mark is never carried here: the caller checked
-- the locked row for one first.
UPDATE chats
SET status = 'requires_action', worker_id = NULL, interrupt_requested_at = NULL,
    pending_tool_calls = $2::jsonb,
    action_deadline_at = clock_timestamp() + make_interval(secs => $3)
WHERE id = $1
RETURNING *;

-- name: runs_lock_expired_actions :many
-- Up to $1 chats whose client did not answer before the deadline, oldest deadline first, from
-- the partial index chats_action_deadline_idx (only requires_action chats are in it, so this is
-- a probe of a tiny index when nothing expired, every sweep of every replica). SKIP LOCKED:
-- replicas sweeping at once take disjoint chats, and a chat a user's transition holds right now
-- (its results being posted, a Stop) is left alone: whoever locks it first decides, the other
-- finds it no longer requires_action.
SELECT id, pending_tool_calls FROM chats
WHERE status = 'requires_action' AND action_deadline_at <= clock_timestamp()
ORDER BY action_deadline_at
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: runs_insert_tool_results :exec
-- The error results of an expired chat's pending calls, one `tool` message (its "message"
-- notification tells watchers), inserted after the row lock like every message.
INSERT INTO chat_messages (chat_id, role, content)
VALUES ($1, 'tool', $2::jsonb);

-- name: runs_end_action :one
-- requires_action -> $2: 'waiting' (the turn is over), or 'pending' when the queue's head was
-- just made the next user message (as at the end of any turn). The calls and the deadline go.
UPDATE chats
SET status = $2, pending_tool_calls = NULL, action_deadline_at = NULL
WHERE id = $1 AND status = 'requires_action'
RETURNING *;
