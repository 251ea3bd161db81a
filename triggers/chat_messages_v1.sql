-- Triggers on chat_messages, statement-level: one notification per chat per statement, however
-- many rows it wrote (a step's assistant message and tool results arrive in one insert).
--
--   chat:<chat id> {"type":"message", chat_id, message_id, version}  message_id is the highest
--                  new id of that chat; readers fetch "messages after my cursor" from the table.
--   chat:<chat id> {"type":"history_reset", chat_id, from_message_id, version}  messages from
--                  from_message_id on were soft-deleted (an edit); readers drop them and re-read.

CREATE FUNCTION chat_messages_notify_insert_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT n.chat_id, max(n.id) AS message_id,
               (SELECT c.version FROM chats c WHERE c.id = n.chat_id) AS version
        FROM new_rows n
        GROUP BY n.chat_id
    LOOP
        PERFORM pg_notify('chat:' || r.chat_id,
            json_build_object('type', 'message', 'chat_id', r.chat_id,
                              'message_id', r.message_id, 'version', r.version)::text);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER chat_messages_notify_insert
    AFTER INSERT ON chat_messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chat_messages_notify_insert_v1();

CREATE FUNCTION chat_messages_notify_update_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT n.chat_id, min(n.id) AS from_message_id,
               (SELECT c.version FROM chats c WHERE c.id = n.chat_id) AS version
        FROM new_rows n
        JOIN old_rows o ON o.id = n.id
        WHERE n.deleted AND NOT o.deleted
        GROUP BY n.chat_id
    LOOP
        PERFORM pg_notify('chat:' || r.chat_id,
            json_build_object('type', 'history_reset', 'chat_id', r.chat_id,
                              'from_message_id', r.from_message_id, 'version', r.version)::text);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER chat_messages_notify_update
    AFTER UPDATE ON chat_messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chat_messages_notify_update_v1();
