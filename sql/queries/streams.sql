-- Queries of the stream hubs (app/streams.py). A hub answers every notification of a chat with
-- ONE read, whatever the number of clients watching it on this replica, and the reads of all the
-- hubs that need one at the same moment share ONE statement. One statement is also one
-- snapshot: a step's message and the deletion of its live parts commit together, so a
-- statement that reads both sees either the parts or the message, never neither.

-- name: stream_read :many
-- The reads of every hub of this replica that needs one at the same moment, in ONE statement:
-- one row per request, in request order (a flush of a worker notifies many chats at once; their
-- hubs here share this statement instead of one each). Per request, by position in the arrays:
-- $1 chat id; $2 read history (messages after $3, live parts from $4 on); $5 read the queue.
-- $6 the message cursors of all the positions being advanced (the hubs' and those of joining
-- clients): for each one that was soft-deleted since (an edit), `resets` maps it to the first id
-- the position must drop (one more than the last visible message before it). Message ids are
-- unique across chats, so one flat array serves every request (`d.chat_id = c.id`).
--
-- `found` is false for a chat that does not exist (any more). The CASE branches are evaluated
-- only when asked for. Live parts are those of the chat's current generation: parts an earlier
-- run left behind are not part of the step in progress. Every range is served by an index on
-- (chat_id, id).
SELECT c.id IS NOT NULL AS found,
       c.status,
       c.version,
       c.generation,
       c.last_error,
       CASE WHEN r.history THEN ARRAY(
           SELECT m FROM chat_messages m
           WHERE m.chat_id = c.id AND m.id > r.after_message_id AND NOT m.deleted
           ORDER BY m.id)
       END AS messages,
       CASE WHEN r.history THEN ARRAY(
           SELECT p FROM chat_stream_parts p
           WHERE p.chat_id = c.id AND p.id >= r.from_part_id AND p.generation = c.generation
           ORDER BY p.id)
       END AS parts,
       CASE WHEN r.queue THEN ARRAY(
           SELECT q FROM chat_queued_messages q
           WHERE q.chat_id = c.id
           ORDER BY q.promoted DESC, q.id)
       END AS queue,
       (SELECT jsonb_object_agg(
                   d.id::text,
                   (SELECT coalesce(max(k.id), 0) + 1
                    FROM chat_messages k
                    WHERE k.chat_id = c.id AND k.id < d.id AND NOT k.deleted))
        FROM chat_messages d
        WHERE d.id = ANY($6::bigint[]) AND d.chat_id = c.id AND d.deleted) AS resets
FROM unnest($1::uuid[], $2::boolean[], $3::bigint[], $4::bigint[], $5::boolean[])
     WITH ORDINALITY AS r(chat_id, history, after_message_id, from_part_id, queue, n)
LEFT JOIN chats c ON c.id = r.chat_id
ORDER BY r.n;
