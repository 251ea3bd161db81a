"""The one place where the tools of a run are merged from every source (docs/tools.md):

1. built-in tools (builtin.py),
2. the sub-agent tools (agent_tools.py),
3. plug-ins: every entry point of the `chatd.tools` group (see registry.py),
4. the tools of the chat's MCP servers, namespaced `<server>__<tool>` (mcp.py, mcp_tools.py).

The first three are the same for every chat and are merged once, when the replica starts
(`default_registry()`); a name clash among them stops the replica with an error naming both
sources. The MCP tools depend on the chat (which servers it chose, which are enabled, their
allow and deny lists, what the servers list now), so `ToolCatalog.for_chat()` merges them into
a fresh registry before every model step; an MCP tool whose name is taken is refused (logged
with both sources) and the run goes on with the rest. The model is offered exactly the tools
of that registry, and its calls are executed through it."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from importlib.metadata import entry_points

import asyncpg

from app.log import get_logger
from app.state import mcp_servers
from app.state.mcp_servers import McpServer
from app.tools.agent_tools import register_subagent_tools
from app.tools.builtin import register_builtin_tools
from app.tools.mcp import McpClients
from app.tools.mcp_tools import server_tools
from app.tools.registry import ENTRY_POINT_GROUP, Tool, ToolNameClash, ToolRegistry

log = get_logger(__name__)


def default_registry() -> ToolRegistry:
    """The tools every chat has: built-ins, sub-agent tools and every plug-in of the
    `chatd.tools` entry point group (each plug-in's tools are marked with its name, so that a
    clash says whose tool was refused)."""
    registry = ToolRegistry()
    register_builtin_tools(registry)
    register_subagent_tools(registry)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        staged = ToolRegistry()
        entry_point.load()(staged)
        for tool in staged.tools():
            registry.register(dataclasses.replace(tool, source=f"plug-in {entry_point.name!r}"))
        log.info("tools.plugin_loaded", plugin=entry_point.name, tools=len(staged.names()))
    return registry


class ToolCatalog:
    """A replica's sources of tools: the static registry and its MCP connections."""

    def __init__(
        self, pool: asyncpg.Pool, static: ToolRegistry, mcp: McpClients | None = None
    ) -> None:
        self._pool = pool
        self.static = static
        self._mcp = mcp

    async def for_chat(self, chat_id: uuid.UUID) -> ToolRegistry:
        """The tools of the chat's next model step: the static ones, then its MCP servers'."""
        if self._mcp is None:
            return self.static
        servers = await mcp_servers.servers_for_chat(self._pool, chat_id)
        if not servers:
            return self.static
        registry = ToolRegistry(self.static.tools())
        for tool in await self._mcp_tools(servers):
            try:
                registry.register(tool)
            except ToolNameClash as exc:
                log.warning("tools.name_clash", chat_id=chat_id, error=str(exc))
        return registry

    async def _mcp_tools(self, servers: list[McpServer]) -> list[Tool]:
        """Every server's offered tools, listed concurrently (each listing is bounded by the
        connect timeout and never raises: a server that cannot list offers what it listed
        last, or nothing)."""
        mcp = self._mcp
        assert mcp is not None
        connections = [mcp.connection(server) for server in servers]
        async with asyncio.TaskGroup() as group:
            listings = [
                group.create_task(connection.tools(server.version), name=f"mcp-list:{server.name}")
                for server, connection in zip(servers, connections, strict=True)
            ]
        tools: list[Tool] = []
        for server, connection, listing in zip(servers, connections, listings, strict=True):
            tools += server_tools(
                server, listing.result(), connection, default_timeout_s=mcp.call_timeout_s
            )
        return tools
