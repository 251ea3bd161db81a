"""The one place where the tools of a run are merged from every source (docs/tools.md):

1. built-in tools (builtin.py),
2. the sub-agent tools (agent_tools.py),
3. plug-ins: every entry point of the `chatd.tools` group (see registry.py),
4. the tools of the chat's MCP servers, namespaced `<server>__<tool>` (mcp.py, mcp_tools.py),
5. the chat's client-side tools, which its client runs (docs/requires_action.md).

The first three are the same for every chat and are merged once, when the replica starts
(`default_registry()`); a name clash among them stops the replica with an error naming both
sources. The others depend on the chat (which MCP servers it chose, which are enabled, their
allow and deny lists, what the servers list now; the client tools its last create or send
named; both read with the step's prompt, app/state/runs.step_context), so
`ToolCatalog.for_step()` merges them before every model step, in that order: a tool
whose name is taken is refused (logged with both sources) and the run goes on with the rest.
The API already refuses a client tool named like a static tool; one named like an MCP tool is
refused here, so the server-side tool is the one that runs. The model is offered exactly the
step's tools (`StepTools`); the server-side ones are executed through its registry, and a call
of a client tool pauses the turn for the client."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from importlib.metadata import entry_points

from app.log import get_logger
from app.providers.base import ToolSpec
from app.state.mcp_servers import McpServer
from app.state.runs import StepContext
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


@dataclass(frozen=True)
class StepTools:
    """The tools of one model step: `registry` runs on this replica (static and MCP tools),
    `client` are the chat's client-side tools (their calls go to the chat's client)."""

    registry: ToolRegistry
    client: tuple[ToolSpec, ...] = ()

    @property
    def client_names(self) -> frozenset[str]:
        return frozenset(spec.name for spec in self.client)


class ToolCatalog:
    """A replica's sources of tools: the static registry and its MCP connections (and, per
    chat, the client tools its rows carry)."""

    def __init__(self, static: ToolRegistry, mcp: McpClients | None = None) -> None:
        self.static = static
        self._mcp = mcp

    def names(self) -> list[str]:
        """The static tools' names (the MCP tools' depend on the chat and the step)."""
        return self.static.names()

    async def for_step(self, context: StepContext) -> StepTools:
        """The tools of the chat's next model step: the static ones, those of its MCP servers,
        then its client tools (both as the step's context read them)."""
        chat_id = context.chat.id
        registry = self.static
        servers = context.mcp_servers
        if self._mcp is not None and servers:
            registry = ToolRegistry(self.static.tools())
            for tool in await self._mcp_tools(servers):
                try:
                    registry.register(tool)
                except ToolNameClash as exc:
                    log.warning("tools.name_clash", chat_id=chat_id, error=str(exc))
        client: list[ToolSpec] = []
        for spec in context.client_tools:
            taken = registry.get(spec.name)
            if taken is not None:
                log.warning(
                    "tools.name_clash",
                    chat_id=chat_id,
                    error=f"the client tool {spec.name!r} is refused: {taken.source} already"
                    " registered a tool of that name",
                )
                continue
            client.append(spec)
        return StepTools(registry, tuple(client))

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
