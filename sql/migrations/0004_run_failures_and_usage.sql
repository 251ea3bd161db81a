-- 0004: the poison-chat guard and the usage that has no message of its own.
--
-- chats.failed_runs counts the runs of a chat in a row that ended without progress because the
-- run crashed (a bug, a row the database refused) or its replica died while running it. A step
-- persisted or a turn ended resets it; at max_failed_runs the chat ends in `error` with kind
-- "poison" instead of being requeued once more. Database outages do not count (they say nothing
-- about the chat).
ALTER TABLE chats ADD COLUMN failed_runs integer NOT NULL DEFAULT 0;

-- Model usage that is not carried by a message: title requests, attempts that failed (retried
-- or terminal), interrupted steps with no output and steps dropped by a stopping run, after the
-- provider had reported usage. Steps, interrupted steps with output and compaction summaries
-- keep their usage on their message in chat_messages. Spend is the sum over both
-- (the chat_spend view); spend limits read the same sum.
CREATE TABLE chat_usage (
    id                 bigserial PRIMARY KEY,
    chat_id            uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    kind               text NOT NULL
                       CHECK (kind IN ('title', 'failed_attempt', 'interrupted', 'abandoned')),
    model_config_id    uuid REFERENCES chat_model_configs (id),
    input_tokens       integer NOT NULL DEFAULT 0,
    output_tokens      integer NOT NULL DEFAULT 0,
    cache_read_tokens  integer NOT NULL DEFAULT 0,
    cache_write_tokens integer NOT NULL DEFAULT 0,
    cost_micros        bigint NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX chat_usage_chat_id_idx ON chat_usage (chat_id, created_at);

-- Every recorded model call, with its chat's organization and owner: what operators sum
-- (SELECT organization_id, owner_id, sum(cost_micros) FROM chat_spend GROUP BY 1, 2).
CREATE VIEW chat_spend AS
SELECT c.organization_id, c.owner_id, m.chat_id, 'message:' || m.role AS kind,
       m.model_config_id, m.input_tokens, m.output_tokens, m.cache_read_tokens,
       m.cache_write_tokens, m.cost_micros, m.created_at
FROM chat_messages m
JOIN chats c ON c.id = m.chat_id
WHERE m.role IN ('assistant', 'system')
UNION ALL
SELECT c.organization_id, c.owner_id, u.chat_id, u.kind, u.model_config_id, u.input_tokens,
       u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.cost_micros, u.created_at
FROM chat_usage u
JOIN chats c ON c.id = u.chat_id;
