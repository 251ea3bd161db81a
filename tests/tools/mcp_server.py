"""A real MCP server for the tests, written with the `mcp` SDK's server API and run as a process
of its own: `python tests/tools/mcp_server.py stdio`, or `... http --port N` (streamable HTTP at
http://127.0.0.1:N/mcp).

Its tools cover what chatd must handle: a plain result (`add`), structured content
(`echo_structured`), a content type chatd only describes (`image`), a tool error (`fail`), a
process that dies in the middle of a call (`crash`) and a call that never answers (`hang`).
`whoami` tells which process answered (tests of restarts) and what its environment says (tests
of env secrets); `header` what HTTP header a request carried (tests of header secrets). With
MCP_TEST_EXTRA_TOOL set in its environment the server also offers `extra`, so a test can change
the tool list by changing the server's configuration.

It imports nothing of chatd: it is what an operator would run."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image

# A 1x1 transparent PNG.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6300010000050001"
    "0d0a2db40000000049454e44ae426082"
)

server: MCPServer[Any] = MCPServer("chatd-test")


@server.tool()
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@server.tool()
def echo_structured(value: dict[str, Any]) -> dict[str, Any]:
    """Return `value` as structured content."""
    return {"echoed": value}


@server.tool()
def image() -> Image:
    """A tiny PNG image."""
    return Image(data=PNG_1X1, format="png")


@server.tool()
def fail(reason: str) -> str:
    """Always fails with `reason`."""
    raise ToolError(reason)


@server.tool()
def crash() -> str:
    """The server process exits in the middle of the call."""
    sys.stdout.flush()
    os._exit(3)


@server.tool()
async def hang() -> str:
    """Never answers."""
    await asyncio.Event().wait()
    return "unreachable"


@server.tool()
def whoami() -> dict[str, Any]:
    """This process's id and the value of MCP_TEST_SECRET in its environment."""
    return {"pid": os.getpid(), "secret": os.environ.get("MCP_TEST_SECRET")}


@server.tool()
def header(name: str, ctx: Context) -> str:
    """The value of the HTTP request header `name` (empty over stdio or when absent)."""
    request = ctx.request_context.request
    headers = getattr(request, "headers", None)
    return str(headers.get(name, "")) if headers is not None else ""


if os.environ.get("MCP_TEST_EXTRA_TOOL"):

    @server.tool()
    def extra() -> str:
        """Only offered when MCP_TEST_EXTRA_TOOL is set."""
        return "extra"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    if options.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=options.port)


if __name__ == "__main__":
    main()
