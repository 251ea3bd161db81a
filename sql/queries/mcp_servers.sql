-- Queries of the MCP server registry (app/state/mcp_servers.py): admin writes, the ids a chat
-- may choose, and the servers a chat's run uses.

-- name: mcp_servers_list :many
SELECT * FROM mcp_servers ORDER BY name, id;

-- name: mcp_servers_lock :one
SELECT * FROM mcp_servers WHERE id = $1 FOR UPDATE;

-- name: mcp_servers_insert :one
INSERT INTO mcp_servers (name, transport, enabled, allow_tools, deny_tools, call_timeout_s)
VALUES ($1, $2::jsonb, $3, $4::text[], $5::text[], $6)
RETURNING *;

-- name: mcp_servers_update :one
-- PATCH: each column only when given (NULL = unchanged). allow_tools and call_timeout_s may be
-- set to NULL on purpose, so each has a flag that says it was given. Every update bumps
-- version: replicas reconnect or list the tools again.
UPDATE mcp_servers
SET name = coalesce($2, name),
    transport = coalesce($3::jsonb, transport),
    enabled = coalesce($4, enabled),
    allow_tools = CASE WHEN $5 THEN $6::text[] ELSE allow_tools END,
    deny_tools = coalesce($7::text[], deny_tools),
    call_timeout_s = CASE WHEN $8 THEN $9::double precision ELSE call_timeout_s END,
    version = version + 1,
    updated_at = now()
WHERE id = $1
RETURNING *;

-- name: mcp_servers_delete :one
-- Chats that chose the server keep its id in chats.mcp_server_ids; their runs skip it.
DELETE FROM mcp_servers WHERE id = $1 RETURNING id;

-- name: mcp_servers_existing_ids :many
SELECT id FROM mcp_servers WHERE id = ANY($1::uuid[]);
