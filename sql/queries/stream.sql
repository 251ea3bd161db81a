-- Queries of the stream hubs (app/stream/). A hub answers every notification of a chat with
-- ONE read, whatever the number of clients watching it on this replica, and the reads of all the
-- hubs that need one at the same moment share ONE statement. One statement is also one
-- snapshot: a step's message and the deletion of its live parts commit together, so a
-- statement that reads both sees either the parts or the message, never neither.

-- name: stream_read :many
-- The reads of every hub of this replica that needs one at the same moment, in ONE statement:
-- one row per request, in request order (a flush of a worker notifies many chats at once; their
-- hubs here share this statement instead of one each; a hub's own read and the snapshot pages of
-- its joining clients are separate requests of the same statement, so they see the same state).
-- Per request, by position in the arrays: $1 chat id; $2 read history (messages after $3, live
-- parts from $4 on); $5 read the queue. $6 the message cursors of all the positions being
-- advanced: for each one that was soft-deleted since (an edit), `resets` maps it to the first id
-- the position must drop (one more than the last visible message before it). Message ids are
-- unique across chats, so one flat array serves every request (`d.chat_id = c.id`).
--
-- Pages. Messages are read in pages of at most $7 messages and at most $8 bytes of content (a
-- page always holds at least one message, so it is at most max($8, one message) bytes): a
-- snapshot from `0:0` of a chat of large messages must not load and decode the whole history in
-- one go. `more_messages` says that messages after the page were left out; the caller continues
-- from the page's last id. The live parts (which come after every message) are read only with
-- the last page. The page is cut BEFORE the running byte sum is taken: only the first $7 + 1
-- rows are ever sized, and only the ids of the page are kept: the rows themselves are read
-- once, for the page only. A message's size is that of its content decompressed in memory (what
-- `|| '[]'` makes; pg_column_size of the stored value would be the compressed size, which a
-- repetitive text makes tiny): about its size as text, at a tenth of the cost of `::text`.
--
-- Live parts are those of the chat's current generation, and only while the chat is `running`:
-- parts an earlier run left behind are not part of the step in progress, and neither are the
-- parts of a run that was stopped by archiving (its parts are deleted in the archive
-- transaction, but a part flush may still commit after it). THIS FILTER IS REQUIRED: it is what
-- lets the part flush insert without locking the chat row (FOR SHARE): whatever a fenced-out run
-- manages to flush after its chat stopped running is never shown to anyone.
--
-- Live parts come as parallel arrays of plain columns, not as row composites: `part_ids` (after
-- $4), `part_roles`, `part_texts` (the stored JSON as text, spliced into the event as it is) and
-- `part_retry_ids` (the retry notices among them); `part_held` says whether the part AT $4 is
-- still live (the position reading it already has it: only its presence matters, it tells that
-- the step is still there). This read runs for every batch of tokens of every watched chat:
-- decoding a composite per part (every column of the row, the JSON parsed and encoded again)
-- was most of its client cost.
--
-- $9 asks for the chat's state: `newest_message_id` and `newest_part_id` (of the step in
-- progress, by the same rule), which a hub takes as its own position (never a client's cursor),
-- and against which a snapshot's cursor is checked. A hub's live reads do not need them.
--
-- `pending_tool_calls` and `action_deadline_at` are set while the chat is requires_action: what
-- the `action_required` event carries.
--
-- `found` is false for a chat that does not exist (any more). The CASE branches are evaluated
-- only when asked for. Every range is served by an index on (chat_id, id).
SELECT c.id IS NOT NULL AS found,
       r.state,
       c.status,
       c.version,
       c.generation,
       c.last_error,
       c.pending_tool_calls,
       c.action_deadline_at,
       CASE WHEN r.history THEN ARRAY(
           SELECT m FROM chat_messages m
           WHERE m.chat_id = c.id AND m.id = ANY(page.ids)
           ORDER BY m.id)
       END AS messages,
       coalesce(page.more, false) AS more_messages,
       CASE WHEN r.history AND NOT coalesce(page.more, false) THEN live.ids END AS part_ids,
       live.roles AS part_roles,
       live.texts AS part_texts,
       live.retry_ids AS part_retry_ids,
       live.held AS part_held,
       CASE WHEN r.queue THEN ARRAY(
           SELECT q FROM chat_queued_messages q
           WHERE q.chat_id = c.id
           ORDER BY q.promoted DESC, q.id)
       END AS queue,
       CASE WHEN r.state THEN
           (SELECT n.id FROM chat_messages n
            WHERE n.chat_id = c.id AND NOT n.deleted
            ORDER BY n.id DESC LIMIT 1)
       END AS newest_message_id,
       CASE WHEN r.state AND c.status = 'running' THEN
           (SELECT s.id FROM chat_stream_parts s
            WHERE s.chat_id = c.id AND s.generation = c.generation
            ORDER BY s.id DESC LIMIT 1)
       END AS newest_part_id,
       (SELECT jsonb_object_agg(
                   d.id::text,
                   (SELECT coalesce(max(k.id), 0) + 1
                    FROM chat_messages k
                    WHERE k.chat_id = c.id AND k.id < d.id AND NOT k.deleted))
        FROM chat_messages d
        WHERE d.id = ANY($6::bigint[]) AND d.chat_id = c.id AND d.deleted) AS resets
FROM unnest($1::uuid[], $2::boolean[], $3::bigint[], $4::bigint[], $5::boolean[], $9::boolean[])
     WITH ORDINALITY AS r(chat_id, history, after_message_id, from_part_id, queue, state, n)
LEFT JOIN chats c ON c.id = r.chat_id
LEFT JOIN LATERAL (
    SELECT array_agg(w.id) FILTER (WHERE w.fits) AS ids, bool_or(NOT w.fits) AS more
    FROM (
        SELECT f.id,
               row_number() OVER o <= $7::int
               AND (row_number() OVER o = 1
                    OR sum(pg_column_size(f.content || '[]'::jsonb)) OVER o <= $8::bigint) AS fits
        FROM (
            SELECT m.id, m.content
            FROM chat_messages m
            WHERE r.history AND m.chat_id = c.id AND m.id > r.after_message_id AND NOT m.deleted
            ORDER BY m.id
            LIMIT $7::int + 1
        ) f
        WINDOW o AS (ORDER BY f.id)
    ) w
) page ON true
LEFT JOIN LATERAL (
    SELECT coalesce(array_agg(p.id ORDER BY p.id) FILTER (WHERE p.id > r.from_part_id),
                    '{}') AS ids,
           coalesce(array_agg(p.message_role ORDER BY p.id) FILTER (WHERE p.id > r.from_part_id),
                    '{}') AS roles,
           coalesce(array_agg(p.part::text ORDER BY p.id) FILTER (WHERE p.id > r.from_part_id),
                    '{}') AS texts,
           coalesce(array_agg(p.id ORDER BY p.id)
                        FILTER (WHERE p.id > r.from_part_id AND p.part->>'type' = 'retry'),
                    '{}') AS retry_ids,
           coalesce(bool_or(p.id = r.from_part_id), false) AS held
    FROM chat_stream_parts p
    WHERE r.history AND NOT coalesce(page.more, false) AND c.status = 'running'
      AND p.chat_id = c.id AND p.id >= r.from_part_id AND p.generation = c.generation
) live ON true
ORDER BY r.n;
