"""Everything that touches the `mcp` SDK: connecting over stdio or streamable HTTP, listing, one
call, and what a result means to the model.

It is a module of its own so that it is imported only when a replica first connects to an MCP
server (app/tools/mcp.py imports it late): the SDK takes seconds of CPU to import (its protocol
models, its server side), which a replica that uses no MCP server must not pay at every start.
It imports nothing of app/tools/mcp.py, so the late import runs in no circle.

Results (docs/tools.md, "Results"): the text blocks joined; the structured content as JSON
(alone when the text only repeats it, as the MCP spec asks servers to do); every other block as
a described placeholder such as `[image: image/png, 1234 bytes]`. Text is cut at
MAX_TEXT_CHARS."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import mcp_types
from mcp import Client, StdioServerParameters
from mcp.client.session import IncomingMessage, MessageHandlerFnT
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

from app.log import get_logger
from app.state.mcp_servers import HttpTransport, StdioTransport, Transport

log = get_logger(__name__)

CLIENT_INFO = mcp_types.Implementation(name="chatd", version="0.1.0")
# The read bound of the HTTP transport's streams (the SDK's own default); calls are bounded by
# their own timeout.
HTTP_READ_TIMEOUT_S = 300.0
# The most tools taken from one server, and the pages read to get them.
MAX_TOOLS_PER_SERVER = 128
MAX_LIST_PAGES = 16
MAX_TEXT_CHARS = 40_000


async def connect(
    stack: contextlib.AsyncExitStack,
    transport: Transport,
    *,
    connect_timeout_s: float,
    on_end: Callable[[], None],
    on_message: MessageHandlerFnT,
) -> Client:
    """Enter a connected client on `stack` (the caller's task must leave it: anyio scopes).
    `on_end` is called when the server's side of the transport ends (below)."""
    if isinstance(transport, StdioTransport):
        params = StdioServerParameters(
            command=transport.command, args=list(transport.args), env=dict(transport.env)
        )
        opened = _watched(stdio_client(params, errlog=sys.stderr), on_end)
    else:
        assert isinstance(transport, HttpTransport)
        http = await stack.enter_async_context(
            httpx2.AsyncClient(
                headers=dict(transport.headers),
                timeout=httpx2.Timeout(connect_timeout_s, read=HTTP_READ_TIMEOUT_S),
            )
        )
        opened = _watched(streamable_http_client(transport.url, http_client=http), on_end)
    return await stack.enter_async_context(
        Client(opened, cache=None, client_info=CLIENT_INFO, message_handler=on_message)
    )


def lists_changed(message: IncomingMessage) -> bool:
    """Whether the server said that its tool list changed."""
    return isinstance(message, mcp_types.ToolListChangedNotification)


@contextlib.asynccontextmanager
async def _watched(
    inner: contextlib.AbstractAsyncContextManager[Any], on_end: Callable[[], None]
) -> AsyncIterator[tuple[Any, Any]]:
    """The SDK's transport with one more thing: when the server's side of it ends (a stdio
    server's stdout closed because it exited or crashed, an HTTP transport torn down), `on_end`
    is called, so the supervisor notices a dead server before the next call does."""
    async with inner as (read_stream, write_stream):
        send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)

        async def forward() -> None:
            try:
                async with send:
                    async for item in read_stream:
                        await send.send(item)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the session is gone: it is closing
            finally:
                on_end()

        async with anyio.create_task_group() as group:
            group.start_soon(forward)
            try:
                yield receive, write_stream
            finally:
                group.cancel_scope.cancel()
                receive.close()


async def list_tools(client: Client) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _page in range(MAX_LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None or len(tools) >= MAX_TOOLS_PER_SERVER:
            break
    if len(tools) > MAX_TOOLS_PER_SERVER:
        log.warning("mcp.too_many_tools", offered=len(tools), kept=MAX_TOOLS_PER_SERVER)
    return tools[:MAX_TOOLS_PER_SERVER]


@dataclass(frozen=True)
class CallFailure:
    """A call the server did not answer with a result. `closed`: the connection ended under
    it (the server crashed or exited); else `message` is the server's protocol error."""

    closed: bool
    message: str = ""


async def call_tool(
    client: Client, tool: str, args: dict[str, Any]
) -> tuple[Any, bool] | CallFailure:
    """The result as the model reads it and whether it is an error, or why there is none."""
    try:
        result = await client.call_tool(tool, args)
    except MCPError as exc:
        if exc.code == mcp_types.CONNECTION_CLOSED:
            return CallFailure(closed=True)
        return CallFailure(closed=False, message=exc.message[:1000])
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        return CallFailure(closed=True)
    return result_value(result), result.is_error


def result_value(result: mcp_types.CallToolResult) -> Any:
    """What the model reads of a result (see the module docstring)."""
    text = "\n".join(_describe_block(block) for block in result.content)
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
