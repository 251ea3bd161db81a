-- Trigger on chat_stream_parts, statement-level. A replica flushes the live parts of all the
-- chats it runs in one multi-row insert per window, so this fires once per window and sends one
-- small notification per chat in it:
--
--   chat:<chat id> {"type":"parts", chat_id, part_id, generation}  part_id is the highest new
--                  part id of that chat; readers fetch "parts after my cursor" from the table.
--
-- Deleting parts (when their step's message is persisted) sends nothing: the message
-- notification of the same transaction tells readers everything they need.

CREATE FUNCTION chat_stream_parts_notify_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT p.chat_id, max(p.id) AS part_id, max(p.generation) AS generation
        FROM new_rows p
        GROUP BY p.chat_id
    LOOP
        PERFORM pg_notify('chat:' || r.chat_id,
            json_build_object('type', 'parts', 'chat_id', r.chat_id,
                              'part_id', r.part_id, 'generation', r.generation)::text);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER chat_stream_parts_notify
    AFTER INSERT ON chat_stream_parts
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chat_stream_parts_notify_v1();
