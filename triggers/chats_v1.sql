-- Triggers on chats. Every notification about a chat row comes from here, never from Python:
-- NOTIFY is transactional, so a notification exists iff its change committed, and listeners
-- receive notifications in commit order.
--
-- Channels (documented in docs/notifications.md):
--   chat_wake            payload: the chat id. A chat became pending; replicas with spare
--                        capacity try to acquire.
--   chat:<chat id>       {"type":"chat", chat_id, version, status, worker_id, generation,
--                         interrupt_requested, archived} on every change of the row;
--                        {"type":"deleted", chat_id, version} when the row is deleted.
--   chat_owner:<user id> {"type":"created"|"updated"|"deleted", chat_id, version, status, title,
--                         archived, parent_chat_id} when the chat list of that user changes
--                        (insert, status, title, archived, delete), not on heartbeats.

-- version strictly increases on every UPDATE, whoever makes it (worker, API, psql by hand); a
-- subscriber drops any chat notification whose version is not newer than what it already read.
CREATE FUNCTION chats_bump_version_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END
$$;

CREATE TRIGGER chats_bump_version
    BEFORE UPDATE ON chats
    FOR EACH ROW EXECUTE FUNCTION chats_bump_version_v1();

CREATE FUNCTION chats_notify_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('chat:' || OLD.id,
            json_build_object('type', 'deleted', 'chat_id', OLD.id, 'version', OLD.version)::text);
        PERFORM pg_notify('chat_owner:' || OLD.owner_id,
            json_build_object('type', 'deleted', 'chat_id', OLD.id, 'version', OLD.version,
                              'status', OLD.status, 'title', OLD.title, 'archived', OLD.archived,
                              'parent_chat_id', OLD.parent_chat_id)::text);
        RETURN NULL;
    END IF;

    PERFORM pg_notify('chat:' || NEW.id,
        json_build_object('type', 'chat', 'chat_id', NEW.id, 'version', NEW.version,
                          'status', NEW.status, 'worker_id', NEW.worker_id,
                          'generation', NEW.generation,
                          'interrupt_requested', NEW.interrupt_requested_at IS NOT NULL,
                          'archived', NEW.archived)::text);

    IF NEW.status = 'pending' AND (TG_OP = 'INSERT' OR OLD.status <> 'pending') THEN
        PERFORM pg_notify('chat_wake', NEW.id::text);
    END IF;

    IF TG_OP = 'INSERT'
       OR OLD.status <> NEW.status
       OR OLD.title <> NEW.title
       OR OLD.archived <> NEW.archived THEN
        PERFORM pg_notify('chat_owner:' || NEW.owner_id,
            json_build_object('type', CASE TG_OP WHEN 'INSERT' THEN 'created' ELSE 'updated' END,
                              'chat_id', NEW.id, 'version', NEW.version, 'status', NEW.status,
                              'title', NEW.title, 'archived', NEW.archived,
                              'parent_chat_id', NEW.parent_chat_id)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER chats_notify
    AFTER INSERT OR UPDATE OR DELETE ON chats
    FOR EACH ROW EXECUTE FUNCTION chats_notify_v1();
