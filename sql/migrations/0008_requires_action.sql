-- 0008: client-side tools and the `requires_action` status (docs/requires_action.md).
--
-- A chat may carry tool definitions that its client executes (`client_tools`, replaced by a
-- create or a send that names `tools`). When the model calls one, the run persists the step and
-- the chat goes to `requires_action` with the calls the client must answer
-- (`pending_tool_calls`, [{id, name, args}]) and the moment the replicas stop waiting for them
-- (`action_deadline_at`); no replica owns it meanwhile (worker_id is NULL). The client's results
-- make it `pending` again; the deadline, a Stop or an archive give the calls error results.
--
-- No trigger changes: chats_notify_v1 already sends the status on every change of the row
-- (`chat:<id>`, and `chat_owner:<user id>` when the status changes), so watchers and chat lists
-- see the new status; chat_wake fires when the results make the chat pending.
ALTER TABLE chats DROP CONSTRAINT chats_status_check;
ALTER TABLE chats ADD CONSTRAINT chats_status_check
    CHECK (status IN ('waiting', 'pending', 'running', 'requires_action', 'error'));

ALTER TABLE chats
    ADD COLUMN client_tools       jsonb NOT NULL DEFAULT '[]'
                                  CHECK (jsonb_typeof(client_tools) = 'array'),
    ADD COLUMN pending_tool_calls jsonb CHECK (jsonb_typeof(pending_tool_calls) = 'array'),
    ADD COLUMN action_deadline_at timestamptz;

-- The calls and the deadline exist exactly while the chat waits for its client.
ALTER TABLE chats ADD CONSTRAINT chats_action_has_calls
    CHECK ((status = 'requires_action')
           = (pending_tool_calls IS NOT NULL AND action_deadline_at IS NOT NULL));

-- The replicas' sweepers look for expired deadlines; the partial index holds only the chats
-- that wait for a client.
CREATE INDEX chats_action_deadline_idx ON chats (action_deadline_at)
    WHERE status = 'requires_action';
