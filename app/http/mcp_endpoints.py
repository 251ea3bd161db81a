"""The MCP server routes' handlers (admins only; docs/tools.md): list, create, change, delete.
They translate HTTP to calls of app/state/mcp_servers.py; env and header values are never shown
back, and a `[redacted]` value sent back keeps the stored one."""

from __future__ import annotations

from aiohttp import web

from app.errors import ValidationFailed
from app.http.models import (
    CreateMcpServerRequest,
    HttpTransportIn,
    StdioTransportIn,
    UpdateMcpServerRequest,
)
from app.http.routing import Call, json_response
from app.state import mcp_servers
from app.state.mcp_servers import UNSET, McpServerChanges, Transport

# Headers the streamable HTTP transport sets itself: an admin's value would break it.
TRANSPORT_HEADERS = frozenset(
    {
        "accept",
        "connection",
        "content-length",
        "content-type",
        "host",
        "last-event-id",
        "mcp-protocol-version",
        "mcp-session-id",
        "transfer-encoding",
    }
)


def _transport(body: StdioTransportIn | HttpTransportIn) -> Transport:
    if isinstance(body, StdioTransportIn):
        return mcp_servers.stdio(body.command, body.args, body.env)
    reserved = sorted(name for name in body.headers if name.lower() in TRANSPORT_HEADERS)
    if reserved:
        raise ValidationFailed(
            "these headers are set by the MCP transport itself",
            validations=[
                {"field": f"transport.headers.{name}", "detail": "reserved"} for name in reserved
            ],
        )
    return mcp_servers.http(body.url, body.headers)


def _tool_names(names: list[str] | None) -> tuple[str, ...] | None:
    return tuple(dict.fromkeys(names)) if names is not None else None


async def list_mcp_servers(call: Call) -> web.StreamResponse:
    servers = await mcp_servers.list_servers(call.pool)
    return json_response({"mcp_servers": [server.to_json() for server in servers]})


async def create_mcp_server(call: Call) -> web.StreamResponse:
    body = await call.body(CreateMcpServerRequest)
    server = await mcp_servers.create_server(
        call.pool,
        name=body.name,
        transport=_transport(body.transport),
        enabled=body.enabled,
        allow_tools=_tool_names(body.allow_tools),
        deny_tools=_tool_names(body.deny_tools) or (),
        call_timeout_s=body.call_timeout_s,
    )
    return json_response(server.to_json(), status=201)


async def update_mcp_server(call: Call) -> web.StreamResponse:
    server_id = call.path_uuid("id")
    body = await call.body(UpdateMcpServerRequest)
    given = body.model_fields_set
    server = await mcp_servers.update_server(
        call.pool,
        server_id,
        McpServerChanges(
            name=body.name,
            transport=_transport(body.transport) if body.transport is not None else None,
            enabled=body.enabled,
            allow_tools=_tool_names(body.allow_tools) if "allow_tools" in given else UNSET,
            deny_tools=_tool_names(body.deny_tools),
            call_timeout_s=body.call_timeout_s if "call_timeout_s" in given else UNSET,
        ),
    )
    return json_response(server.to_json())


async def delete_mcp_server(call: Call) -> web.StreamResponse:
    await mcp_servers.delete_server(call.pool, call.path_uuid("id"))
    return web.Response(status=204)
