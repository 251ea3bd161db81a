-- 0007: MCP servers (docs/tools.md) and the built-in `script` model.
--
-- An admin registers MCP servers; their tools join the tool set of a chat's runs, namespaced
-- `<name>__<tool>`. `transport` holds what is needed to reach the server, secrets included:
-- {"type": "stdio", "command", "args", "env"} or {"type": "http", "url", "headers"}; the API
-- never shows env or header values back. `version` is bumped by every update: a replica
-- compares it with the version its connection and tool list were made from, and reconnects or
-- lists the tools again when it is newer (no notification needed).
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

-- The MCP servers a chat chose at creation; NULL means every enabled server at the time of
-- each turn. No foreign key (arrays cannot have one): a deleted server is simply skipped.
ALTER TABLE chats ADD COLUMN mcp_server_ids uuid[];

-- The built-in offline model that calls tools (`/call <tool> <json>`), for demos, tests and
-- benchmarks without a key. Selectable, not the default.
INSERT INTO chat_model_configs (id, provider, model, display_name, context_limit, is_default)
VALUES ('00000000-0000-0000-0000-0000000000e1', 'builtin', 'script', 'Script (offline, calls tools)',
        200000, false);
