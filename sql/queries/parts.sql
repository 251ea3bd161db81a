-- Queries of the live parts of running chats (app/engine/parts.py): the batched flush of every chat a
-- replica runs, and the janitor of the parts no run will settle.

-- name: parts_flush :one
-- One window of live parts of ALL the chats a replica runs, in ONE autocommit statement: one
-- trigger firing, one NOTIFY commit, one round trip, and no transaction left open between
-- round trips (a replica paused mid-window holds no lock). Fenced like every write of a run: a
-- part is written only while its chat is running under the part's run token (worker_id,
-- generation) in this statement's snapshot. Returns the number of parts written.
--
-- No row lock (no FOR SHARE): a user transition holding one chat row (e.g. someone flooding
-- POST /messages at their own running chat, which runs the spend sum and the queue check under
-- FOR UPDATE) must not stall the live parts of every other chat in the batch. The fence without
-- a lock is enough because:
--   - the run's OWN writes are ordered in the process, not by the row: a run settles or
--     discards its parts (PartFlusher.settle / discard waits for the flush in flight) before it
--     persists a step, ends a turn, fails or gives the chat back, so no part of a step commits
--     after the step's message;
--   - a transition by someone else (requeue, edit, archive, re-acquire) may commit between our
--     snapshot and our commit, and the part then lands after the transition deleted the
--     chat's parts: such a late part names a generation that is no longer running, so
--     streams_read never returns it (live parts only while the chat is running that
--     generation) and the orphan-parts janitor (parts_delete_orphans) deletes it.
--
-- The commit does not wait for the WAL flush (synchronous_commit off for this transaction
-- only): nothing it writes outlives a server crash anyway (the parts table is UNLOGGED), so
-- waiting for the disk would only add the fsync to every token's latency and hold the NOTIFY
-- commit lock, which every notifying commit of the cluster queues on, through it. Messages and
-- state changes keep synchronous commits.
--
-- At most once: each part carries its key within its run ($6, seq). When a flush fails with an
-- outage, the flusher cannot know whether the statement committed (the connection may have died
-- after the commit, before the answer) and sends the same parts again; ON CONFLICT DO NOTHING on
-- (chat_id, generation, seq) makes the second write of a part that committed a no-op, so no
-- watcher sees a delta twice (migration 0005).
WITH parts AS (
    SELECT *
    FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::bigint[])
         WITH ORDINALITY AS p(chat_id, worker_id, generation, message_role, part, seq, n)
), inserted AS (
    INSERT INTO chat_stream_parts (chat_id, generation, message_role, part, seq)
    SELECT p.chat_id, p.generation, p.message_role, p.part::jsonb, p.seq
    FROM parts p
    JOIN chats c ON c.id = p.chat_id AND c.status = 'running' AND c.worker_id = p.worker_id
                AND c.generation = p.generation
    ORDER BY p.n
    ON CONFLICT (chat_id, generation, seq) DO NOTHING
    RETURNING 1
)
SELECT count(*), set_config('synchronous_commit', 'off', true) FROM inserted;

-- name: parts_delete_orphans :one
-- The janitor: live parts whose chat is not running that generation any more. A run that lost
-- its chat (archive, edit, requeue) writes nothing, so the parts it flushed before may linger;
-- this removes them. Only rows committed before the statement are seen, and a part a running
-- owner just committed always matches its chat, so nothing live is ever removed.
WITH deleted AS (
    DELETE FROM chat_stream_parts p
    WHERE NOT EXISTS (
        SELECT 1 FROM chats c
        WHERE c.id = p.chat_id AND c.status = 'running' AND c.generation = p.generation
    )
    RETURNING 1
)
SELECT count(*) FROM deleted;
