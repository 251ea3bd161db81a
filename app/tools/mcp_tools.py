"""An MCP server's tools as chatd tools: names, the allow and deny lists, and results.

- Names are namespaced `<server>__<tool>`. Server names are lowercase identifiers without a
  double underscore, so a name says which server it belongs to. A tool whose namespaced name
  the providers would refuse (`[A-Za-z0-9_-]`, at most 64 characters) is left out, logged.
- The server's allow list (when set) and deny list (always; it wins) are applied on every step,
  from the config as it is now, so a change takes effect at the next step of every chat.
- A result becomes the `result` of a `tool_result` part (mcp_sdk.result_value); a result with
  `isError`, and a call the server could not answer, is a tool error (`is_error: true`)."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from app.log import get_logger
from app.state.mcp_servers import McpServer
from app.tools.mcp import McpCallFailed, McpConnection
from app.tools.registry import Tool, ToolContext, ToolError, ToolHandler

if TYPE_CHECKING:
    import mcp_types

log = get_logger(__name__)

SEPARATOR = "__"
# What Anthropic and OpenAI accept as a tool name.
PROVIDER_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_DESCRIPTION_CHARS = 4000
# The registry's bound of a call is a little longer than the connection's own (which covers
# waiting for a connection too), so that the connection's clearer message wins.
REGISTRY_TIMEOUT_MARGIN_S = 5.0


def namespaced(server_name: str, tool_name: str) -> str:
    return f"{server_name}{SEPARATOR}{tool_name}"


def server_tools(
    server: McpServer,
    listing: list[mcp_types.Tool],
    connection: McpConnection,
    *,
    default_timeout_s: float,
) -> list[Tool]:
    """The chatd tools of `server` that are offered: allowed, not denied, nameable."""
    timeout_s = server.call_timeout_s or default_timeout_s
    tools = []
    for listed in listing:
        if not server.offers(listed.name):
            continue
        name = namespaced(server.name, listed.name)
        if not PROVIDER_TOOL_NAME.match(name):
            log.warning("mcp.tool_skipped", server=server.name, tool=listed.name[:200])
            continue
        tools.append(
            Tool(
                name=name,
                description=(listed.description or listed.title or "")[:MAX_DESCRIPTION_CHARS],
                input_schema=_object_schema(listed.input_schema),
                handler=_handler(connection, listed.name, timeout_s),
                timeout_s=timeout_s + REGISTRY_TIMEOUT_MARGIN_S,
                source=f"MCP server {server.name!r}",
            )
        )
    return tools


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Providers want an object schema at the root; MCP requires one too, but be lenient."""
    return schema if schema.get("type") == "object" else {**schema, "type": "object"}


def _handler(connection: McpConnection, tool_name: str, timeout_s: float) -> ToolHandler:
    async def call(args: dict[str, Any], _context: ToolContext) -> Any:
        try:
            value, is_error = await connection.call(tool_name, args, timeout_s=timeout_s)
        except McpCallFailed as exc:
            raise ToolError(str(exc)) from None
        if is_error:
            raise ToolError(value if isinstance(value, str) else json.dumps(value))
        return value

    return call
