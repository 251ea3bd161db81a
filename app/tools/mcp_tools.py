"""An MCP server's tools as chatd tools: names, the allow and deny lists, and results.

- Names are namespaced `<server>__<tool>`. Server names are lowercase identifiers without a
  double underscore, so a name says which server it belongs to. A tool whose namespaced name
  the providers would refuse (`[A-Za-z0-9_-]`, at most 64 characters) is left out, logged.
- The server's allow list (when set) and deny list (always; it wins) are applied on every step,
  from the config as it is now, so a change takes effect at the next step of every chat.
- A result becomes the `result` of a `tool_result` part: the text blocks joined; the structured
  content as JSON (alone when the text only repeats it, as the MCP spec asks servers to do);
  every other block as a described placeholder such as `[image: image/png, 1234 bytes]`. A
  result with `isError` is a tool error (`is_error: true`). Text is cut at MAX_TEXT_CHARS."""

from __future__ import annotations

import json
import re
from typing import Any

import mcp_types

from app.log import get_logger
from app.state.mcp_servers import McpServer
from app.tools.mcp import McpCallFailed, McpConnection
from app.tools.registry import Tool, ToolContext, ToolError

log = get_logger(__name__)

SEPARATOR = "__"
# What Anthropic and OpenAI accept as a tool name.
PROVIDER_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_DESCRIPTION_CHARS = 4000
MAX_TEXT_CHARS = 40_000
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


def _handler(connection: McpConnection, tool_name: str, timeout_s: float) -> Any:
    async def call(args: dict[str, Any], _context: ToolContext) -> Any:
        try:
            result = await connection.call(tool_name, args, timeout_s=timeout_s)
        except McpCallFailed as exc:
            raise ToolError(str(exc)) from None
        value = result_value(result)
        if result.is_error:
            raise ToolError(value if isinstance(value, str) else json.dumps(value))
        return value

    return call


def result_value(result: mcp_types.CallToolResult) -> Any:
    """What the model reads of a result (see the module docstring)."""
    pieces = [_describe_block(block) for block in result.content]
    text = "\n".join(pieces)
    if len(text) > MAX_TEXT_CHARS:
        text = f"{text[:MAX_TEXT_CHARS]}\n[... {len(text) - MAX_TEXT_CHARS} characters cut]"
    structured = result.structured_content
    if structured is None:
        return text
    only_text = all(isinstance(block, mcp_types.TextContent) for block in result.content)
    if only_text and (not text or _same_json(text, structured)):
        return structured
    return {"structured_content": structured, "content": text}


def _describe_block(block: Any) -> str:
    """A text block's text; a placeholder that says what any other block is."""
    if isinstance(block, mcp_types.TextContent):
        described = block.text
    elif isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
        described = f"[{block.type}: {block.mime_type}, {_decoded_size(block.data)} bytes]"
    elif isinstance(block, mcp_types.EmbeddedResource):
        resource = block.resource
        mime = resource.mime_type or "unknown type"
        if isinstance(resource, mcp_types.TextResourceContents):
            size = f"{len(resource.text)} characters"
        else:
            size = f"{_decoded_size(resource.blob)} bytes"
        described = f"[resource: {resource.uri}, {mime}, {size}]"
    elif isinstance(block, mcp_types.ResourceLink):
        described = f"[resource link: {block.uri} ({block.name})]"
    else:
        described = f"[{getattr(block, 'type', 'content')}]"
    return described


def _decoded_size(base64_text: str) -> int:
    """The size of what base64 text encodes, without decoding it."""
    stripped = base64_text.rstrip()
    padding = len(stripped) - len(stripped.rstrip("="))
    return max(len(stripped) * 3 // 4 - padding, 0)


def _same_json(text: str, structured: Any) -> bool:
    """Whether `text` only repeats the structured content: its JSON, or (the SDKs' wrapping of
    a plain return value as `{"result": value}`) that value or its JSON."""
    wrapped = isinstance(structured, dict) and list(structured) == ["result"]
    if wrapped and text == structured["result"]:
        return True  # a string value, as it is
    try:
        parsed = json.loads(text)
    except ValueError:
        return False
    return bool(parsed == structured or (wrapped and parsed == structured["result"]))
