-- Triggers on chat_queued_messages, statement-level, one notification per chat per statement:
--
--   chat:<chat id> {"type":"queue", chat_id, version}  the queue of that chat changed (a message
--                  was queued, popped, promoted, deleted or cleared); readers re-read the queue.

CREATE FUNCTION chat_queued_messages_notify_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT q.chat_id FROM changed_rows q
    LOOP
        PERFORM pg_notify('chat:' || r.chat_id,
            json_build_object('type', 'queue', 'chat_id', r.chat_id,
                              'version', (SELECT c.version FROM chats c WHERE c.id = r.chat_id))::text);
    END LOOP;
    RETURN NULL;
END
$$;

-- Postgres allows a transition table only on a single-event trigger, hence two triggers.
CREATE TRIGGER chat_queued_messages_notify_insert
    AFTER INSERT ON chat_queued_messages
    REFERENCING NEW TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chat_queued_messages_notify_v1();

CREATE TRIGGER chat_queued_messages_notify_delete
    AFTER DELETE ON chat_queued_messages
    REFERENCING OLD TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chat_queued_messages_notify_v1();
