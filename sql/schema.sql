-- The declared schema of chatd: what the database looks like after every migration in
-- sql/migrations/ has run. Edit this file together with each new migration;
-- tests/db/test_migrations.py applies both to fresh databases and asserts that the
-- results are identical, so the two can never drift apart.

CREATE TABLE organizations (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The default organization has a fixed id so that code and operators can name it.
INSERT INTO organizations (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'default');

CREATE TABLE users (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations (id)
                    DEFAULT '00000000-0000-0000-0000-000000000001',
    name            text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    is_admin        boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Tokens are random and shown once; only their SHA-256 is stored, so the unique index on the
-- hash is the lookup path of every authenticated request.
CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash   bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);

CREATE TABLE chat_model_configs (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    provider              text NOT NULL CHECK (provider IN ('anthropic', 'openai', 'builtin')),
    model                 text NOT NULL CHECK (length(model) BETWEEN 1 AND 200),
    display_name          text NOT NULL DEFAULT '',
    context_limit         integer NOT NULL DEFAULT 200000 CHECK (context_limit > 0),
    -- Percent of context_limit at which older messages are summarized.
    compression_threshold integer NOT NULL DEFAULT 70 CHECK (compression_threshold BETWEEN 1 AND 100),
    is_default            boolean NOT NULL DEFAULT false,
    enabled               boolean NOT NULL DEFAULT true,
    -- Provider options: prices (input_micros_per_mtok, ...), token_delay_ms for echo, timeouts.
    options               jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- At most one default model; the partial unique index enforces it.
CREATE UNIQUE INDEX chat_model_configs_one_default ON chat_model_configs (is_default) WHERE is_default;

-- The built-in offline model, so a new installation works with no API key.
INSERT INTO chat_model_configs (id, provider, model, display_name, context_limit, is_default)
VALUES ('00000000-0000-0000-0000-0000000000e0', 'builtin', 'echo', 'Echo (offline)', 200000, true);

-- The built-in offline model that calls tools (`/call <tool> <json>`; migration 0007).
INSERT INTO chat_model_configs (id, provider, model, display_name, context_limit, is_default)
VALUES ('00000000-0000-0000-0000-0000000000e1', 'builtin', 'script', 'Script (offline, calls tools)',
        200000, false);

-- One row per replica process. heartbeat_at is the backstop liveness signal; the primary one is
-- the session advisory lock each replica holds (see sql/queries/replicas.sql).
CREATE TABLE chat_replicas (
    id           uuid PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    address      text NOT NULL DEFAULT '',
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE chats (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_id               uuid NOT NULL REFERENCES users (id),
    organization_id        uuid NOT NULL REFERENCES organizations (id),
    parent_chat_id         uuid REFERENCES chats (id),
    root_chat_id           uuid REFERENCES chats (id),
    title                  text NOT NULL DEFAULT '' CHECK (length(title) <= 200),
    status                 text NOT NULL DEFAULT 'waiting'
                           CHECK (status IN ('waiting', 'pending', 'running', 'requires_action',
                                             'error')),
    -- Bumped by chats_bump_version_v1 on every UPDATE; carried by every notification.
    version                bigint NOT NULL DEFAULT 1,
    -- Bumped on every acquire: the fencing token of a run together with worker_id.
    generation             bigint NOT NULL DEFAULT 0,
    -- No foreign key: a replica row may be deleted while history still names it.
    worker_id              uuid,
    started_at             timestamptz,
    heartbeat_at           timestamptz,
    interrupt_requested_at timestamptz,
    last_error             jsonb,
    model_config_id        uuid REFERENCES chat_model_configs (id),
    client_type            text NOT NULL DEFAULT 'api' CHECK (client_type IN ('ui', 'api')),
    archived               boolean NOT NULL DEFAULT false,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    -- Runs in a row that crashed or whose replica died, without progress (migration 0004).
    failed_runs            integer NOT NULL DEFAULT 0,
    -- The MCP servers the chat chose at creation; NULL: every enabled one (migration 0007).
    mcp_server_ids         uuid[],
    -- Tools the chat's client executes (migration 0008): [{name, description, input_schema}].
    client_tools           jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(client_tools) = 'array'),
    -- While requires_action: the calls the client must answer ([{id, name, args}]) and when the
    -- replicas stop waiting for them.
    pending_tool_calls     jsonb CHECK (jsonb_typeof(pending_tool_calls) = 'array'),
    action_deadline_at     timestamptz,
    -- A running chat always has an owner replica and nothing else has one.
    CONSTRAINT chats_running_has_worker CHECK ((status = 'running') = (worker_id IS NOT NULL)),
    -- The calls and the deadline exist exactly while the chat waits for its client.
    CONSTRAINT chats_action_has_calls
        CHECK ((status = 'requires_action')
               = (pending_tool_calls IS NOT NULL AND action_deadline_at IS NOT NULL))
);

-- Acquire scans pending chats oldest first; the partial index holds only the pending ones, so it
-- stays tiny however many chats exist.
CREATE INDEX chats_pending_idx ON chats (updated_at, id) WHERE status = 'pending';
-- Requeueing a dead replica's chats and the stale sweep look up running chats by worker.
CREATE INDEX chats_running_worker_idx ON chats (worker_id) WHERE status = 'running';
-- A user's chat list, newest first, paged by (created_at, id).
CREATE INDEX chats_owner_created_idx ON chats (owner_id, created_at DESC, id DESC);
-- Sub-agent tools look up children of a chat.
CREATE INDEX chats_parent_idx ON chats (parent_chat_id) WHERE parent_chat_id IS NOT NULL;
-- The sweepers look for chats whose client did not answer in time (migration 0008).
CREATE INDEX chats_action_deadline_idx ON chats (action_deadline_at)
    WHERE status = 'requires_action';

CREATE TABLE chat_messages (
    id                 bigserial PRIMARY KEY,
    chat_id            uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    role               text NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content            jsonb NOT NULL CHECK (jsonb_typeof(content) = 'array'),
    model_config_id    uuid REFERENCES chat_model_configs (id),
    input_tokens       integer NOT NULL DEFAULT 0,
    output_tokens      integer NOT NULL DEFAULT 0,
    cache_read_tokens  integer NOT NULL DEFAULT 0,
    cache_write_tokens integer NOT NULL DEFAULT 0,
    cost_micros        bigint NOT NULL DEFAULT 0,
    -- Summarized into a later summary message; kept for the user's history, left out of prompts.
    compressed         boolean NOT NULL DEFAULT false,
    -- Soft-deleted by an edit of an earlier user message.
    deleted            boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- "Messages of chat X after id N" is the cursor read of every stream and of the prompt builder.
CREATE INDEX chat_messages_chat_id_idx ON chat_messages (chat_id, id);

-- Messages sent while a chat is busy. The head of the queue is the first by
-- (promoted DESC, id): FIFO, except that a message promoted while its chat runs goes first.
CREATE TABLE chat_queued_messages (
    id         bigserial PRIMARY KEY,
    chat_id    uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    content    jsonb NOT NULL CHECK (jsonb_typeof(content) = 'array'),
    promoted   boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX chat_queued_messages_chat_id_idx ON chat_queued_messages (chat_id, id);

-- Live deltas of the step in progress. UNLOGGED: they are worth nothing after a crash (the step
-- is redone), and skipping WAL makes the hottest insert path cheap. No foreign key to chats: the
-- key-share lock of an FK check would queue behind every FOR UPDATE of the chat row.
-- Its ids come from a LOGGED sequence: crash recovery resets the sequences of unlogged tables,
-- and a part id is a stream cursor, which must never go backwards (migration 0003).
CREATE SEQUENCE chat_stream_part_ids;

CREATE UNLOGGED TABLE chat_stream_parts (
    id           bigint PRIMARY KEY DEFAULT nextval('chat_stream_part_ids'),
    chat_id      uuid NOT NULL,
    generation   bigint NOT NULL,
    message_role text NOT NULL DEFAULT 'assistant',
    part         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- The part's key within its run: a flush retried after an outage writes it at most once
    -- (migration 0005). NULL for control parts.
    seq          bigint
);

-- Stream snapshots read "parts of chat X after id N".
CREATE INDEX chat_stream_parts_chat_id_idx ON chat_stream_parts (chat_id, id);
CREATE UNIQUE INDEX chat_stream_parts_run_seq_idx ON chat_stream_parts (chat_id, generation, seq);

-- include: triggers/chats_v1.sql
-- include: triggers/chat_messages_v1.sql
-- include: triggers/chat_queued_messages_v1.sql
-- include: triggers/chat_stream_parts_v1.sql

-- Operator views: psql answers "what is going on".
CREATE VIEW chat_status_summary AS
SELECT status, archived, count(*) AS chats, max(now() - updated_at) AS oldest_change_age
FROM chats
GROUP BY status, archived;

CREATE VIEW chat_activity AS
SELECT c.id AS chat_id,
       c.title,
       c.status,
       c.worker_id,
       r.hostname AS worker_hostname,
       r.pid AS worker_pid,
       c.generation,
       now() - c.started_at AS running_for,
       now() - r.heartbeat_at AS worker_heartbeat_age,
       c.interrupt_requested_at IS NOT NULL AS interrupt_requested
FROM chats c
LEFT JOIN chat_replicas r ON r.id = c.worker_id
WHERE c.status IN ('pending', 'running');

CREATE VIEW chat_replica_health AS
SELECT r.id, r.hostname, r.pid, r.address, r.started_at,
       now() - r.heartbeat_at AS heartbeat_age,
       (SELECT count(*) FROM chats c WHERE c.worker_id = r.id AND c.status = 'running') AS running_chats
FROM chat_replicas r;

-- Spend limits (migration 0002). A row with user_id NULL is the organization's default for each
-- of its users; a row with a user_id overrides it for that user.
CREATE TABLE spend_limits (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id         uuid REFERENCES users (id) ON DELETE CASCADE,
    limit_micros    bigint NOT NULL CHECK (limit_micros >= 0),
    period          text NOT NULL DEFAULT 'month' CHECK (period IN ('day', 'week', 'month')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (organization_id, user_id)
);

CREATE INDEX chats_org_owner_idx ON chats (organization_id, owner_id);

-- Usage without a message (migration 0004; chats.failed_runs is the poison-chat guard's count).
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

-- Browser sessions and one-time login codes (migration 0006; docs/web.md).
CREATE TABLE browser_sessions (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash bytea NOT NULL UNIQUE,
    csrf_token text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE INDEX browser_sessions_user_id_idx ON browser_sessions (user_id);
-- Expired sessions are deleted when sessions are created; this index finds them.
CREATE INDEX browser_sessions_expires_at_idx ON browser_sessions (expires_at);

-- One-time login codes: what `chatd serve` prints, with the embedded database, as a URL that
-- logs a browser in with one click. Stored hashed, short-lived, and spent by the first request
-- that presents one (used_at is set in the same statement that checks it).
CREATE TABLE browser_login_codes (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash  bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);

CREATE INDEX browser_login_codes_user_id_idx ON browser_login_codes (user_id);
CREATE INDEX browser_login_codes_expires_at_idx ON browser_login_codes (expires_at);

-- MCP servers (migration 0007, docs/tools.md). `transport` holds what reaches the server,
-- secrets included: {"type": "stdio", "command", "args", "env"} or {"type": "http", "url",
-- "headers"}; the API never shows env or header values back. `version` is bumped by every
-- update: replicas compare it with what their connection and tool list were made from.
CREATE TABLE mcp_servers (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- A lowercase identifier without a double underscore, so `<name>__<tool>` names one server.
    name           text NOT NULL UNIQUE
                   CHECK (name ~ '^[a-z][a-z0-9]*(_[a-z0-9]+)*$' AND length(name) <= 24),
    transport      jsonb NOT NULL
                   CHECK (jsonb_typeof(transport) = 'object'
                          AND transport ->> 'type' IN ('stdio', 'http')),
    enabled        boolean NOT NULL DEFAULT true,
    -- NULL: every tool of the server; else only these (names as the server spells them).
    allow_tools    text[],
    deny_tools     text[] NOT NULL DEFAULT '{}',
    -- NULL: the replica's CHATD_MCP_CALL_TIMEOUT_S.
    call_timeout_s double precision CHECK (call_timeout_s > 0 AND call_timeout_s <= 3600),
    version        bigint NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
