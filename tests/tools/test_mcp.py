"""MCP servers as a run's tools, against the real test server (tests/tools/mcp_server.py) in
processes of its own, over stdio and over streamable HTTP, through the real SDK: namespacing,
results, allow and deny lists, the tool-list cache and its refresh, a crash (error result, then
a restart), a hang (timeout error result), an unreachable server, and the shutdown of stdio
servers. The registry and the configs are real too (ToolCatalog over the test database)."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import pytest

from app.db.listener import Listener
from app.state import chats, mcp_servers, runs
from app.state.mcp_servers import McpServer, McpServerChanges
from app.state.model import Owner
from app.tools.mcp import McpClients
from app.tools.registry import Tool, ToolContext, ToolOutcome, ToolRegistry
from app.tools.toolset import StepTools, ToolCatalog, default_registry
from tests import engine_harness, factories
from tests.conditions import wait_for
from tests.mcp_harness import SERVER_SCRIPT, http_mcp_server, pid_alive

STATIC = set(default_registry().names())
TEST_TOOLS = {"add", "echo_structured", "image", "fail", "crash", "hang", "whoami", "header"}


def context(chat_id: uuid.UUID) -> ToolContext:
    # MCP tools touch neither the database nor the listener.
    return ToolContext(
        chat_id=chat_id,
        worker_id=uuid.uuid4(),
        generation=1,
        owner=Owner(user_id=uuid.uuid4(), organization_id=uuid.uuid4()),
        parent_chat_id=None,
        pool=cast(asyncpg.Pool, None),
        listener=cast(Listener, None),
    )


@pytest.fixture
async def clients() -> AsyncIterator[McpClients]:
    clients = McpClients(connect_timeout_s=60)
    runner = asyncio.create_task(clients.run(), name="test-mcp")
    try:
        yield clients
    finally:
        await clients.close()
        await asyncio.wait({runner}, timeout=30)
        assert runner.done() and runner.exception() is None


async def stdio_server(pool: asyncpg.Pool, name: str = "test", **fields: Any) -> McpServer:
    env = fields.pop("env", {})
    return await mcp_servers.create_server(
        pool,
        name=name,
        transport=mcp_servers.stdio(sys.executable, [str(SERVER_SCRIPT), "stdio"], env),
        **fields,
    )


async def new_chat(pool: asyncpg.Pool) -> uuid.UUID:
    async with pool.acquire() as conn:
        chat: uuid.UUID = (await factories.create_chat(conn))["id"]
    return chat


async def step_tools(pool: asyncpg.Pool, catalog: ToolCatalog, chat_id: uuid.UUID) -> StepTools:
    """The chat's tools as a run merges them for its next step."""
    context = await runs.step_context(pool, chat_id)
    assert context is not None
    return await catalog.for_step(context)


class Chat:
    """One chat's view of its tools, as a run sees them before each step."""

    def __init__(self, pool: asyncpg.Pool, catalog: ToolCatalog, chat_id: uuid.UUID) -> None:
        self.pool = pool
        self.catalog = catalog
        self.chat_id = chat_id

    async def tools(self) -> ToolRegistry:
        return (await step_tools(self.pool, self.catalog, self.chat_id)).registry

    async def names(self) -> set[str]:
        return set((await self.tools()).names())

    async def call(self, name: str, args: dict[str, Any] | None = None) -> ToolOutcome:
        registry = await self.tools()
        return await registry.call(name, args or {}, context(self.chat_id))

    async def pid(self, tool: str = "test__whoami") -> int:
        outcome = await self.call(tool)
        assert not outcome.is_error, outcome
        pid: int = outcome.result["pid"]
        return pid


async def chat_with(
    pool: asyncpg.Pool, clients: McpClients, static: ToolRegistry | None = None
) -> Chat:
    catalog = ToolCatalog(static or default_registry(), clients)
    return Chat(pool, catalog, await new_chat(pool))


async def test_a_stdio_servers_tools_join_the_chats_tools_namespaced(
    pool: asyncpg.Pool, clients: McpClients
) -> None:
    await stdio_server(pool, env={"MCP_TEST_SECRET": "s3cret"})
    chat = await chat_with(pool, clients)

    assert await chat.names() == STATIC | {f"test__{name}" for name in TEST_TOOLS}
    add = (await chat.tools()).get("test__add")
    assert add is not None and add.description == "Add two numbers."
    assert add.input_schema["required"] == ["a", "b"]

    # Plain results, structured content, other content described, the server's own errors.
    assert await chat.call("test__add", {"a": 2, "b": 3}) == ToolOutcome({"result": 5.0}, False)
    echoed = await chat.call("test__echo_structured", {"value": {"k": [1, "x"]}})
    assert echoed == ToolOutcome({"echoed": {"k": [1, "x"]}}, False)
    image = await chat.call("test__image")
    assert not image.is_error
    assert re.fullmatch(r"\[image: image/png, \d+ bytes\]", image.result)
    failed = await chat.call("test__fail", {"reason": "no such file"})
    assert failed.is_error and "no such file" in failed.result
    invalid = await chat.call("test__add", {"a": "x"})
    assert invalid.is_error
    # The env of the config reaches the server.
    whoami = await chat.call("test__whoami")
    assert whoami.result["secret"] == "s3cret"


async def test_allow_and_deny_lists_apply_at_the_next_step_without_a_restart(
    pool: asyncpg.Pool, clients: McpClients
) -> None:
    server = await stdio_server(pool, allow_tools=("add", "whoami", "hang"), deny_tools=("hang",))
    chat = await chat_with(pool, clients)
    assert await chat.names() == STATIC | {"test__add", "test__whoami"}
    denied = await chat.call("test__hang")
    assert denied == ToolOutcome("unknown tool 'test__hang'", True)
    pid = await chat.pid()

    # Every tool but the denied one; the same process still serves them.
    await mcp_servers.update_server(pool, server.id, McpServerChanges(allow_tools=None))
    assert await chat.names() == STATIC | {f"test__{t}" for t in TEST_TOOLS - {"hang"}}
    assert await chat.pid() == pid

    # A disabled server offers nothing; enabled again, everything.
    await mcp_servers.update_server(pool, server.id, McpServerChanges(enabled=False))
    assert await chat.names() == STATIC
    await mcp_servers.update_server(pool, server.id, McpServerChanges(enabled=True, deny_tools=()))
    assert await chat.names() == STATIC | {f"test__{t}" for t in TEST_TOOLS}


async def test_the_tool_list_is_cached_until_the_config_changes_or_it_expires(
    pool: asyncpg.Pool, clients: McpClients, caplog: pytest.LogCaptureFixture
) -> None:
    server = await stdio_server(pool)
    chat = await chat_with(pool, clients)

    def listings() -> int:
        return sum("mcp.tools_listed" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.INFO, logger="app.tools.mcp"):
        await chat.names()
        await chat.names()
        await chat.call("test__add", {"a": 1, "b": 1})
        assert listings() == 1
        pid = await chat.pid()

        # Any change of the config: listed again, on the same connection.
        await mcp_servers.update_server(pool, server.id, McpServerChanges(deny_tools=("fail",)))
        assert "test__fail" not in await chat.names()
        assert listings() == 2
        assert await chat.pid() == pid

        # Past the TTL (here: at once), every step lists again.
        clients.tools_ttl_s = 0.0
        await chat.names()
        await chat.names()
        assert listings() == 4


async def test_a_changed_transport_restarts_the_server_and_lists_its_new_tools(
    pool: asyncpg.Pool, clients: McpClients
) -> None:
    server = await stdio_server(pool)
    chat = await chat_with(pool, clients)
    assert "test__extra" not in await chat.names()
    old_pid = await chat.pid()

    changed = mcp_servers.stdio(
        sys.executable, [str(SERVER_SCRIPT), "stdio"], {"MCP_TEST_EXTRA_TOOL": "1"}
    )
    await mcp_servers.update_server(pool, server.id, McpServerChanges(transport=changed))
    assert "test__extra" in await chat.names()
    assert await chat.call("test__extra") == ToolOutcome({"result": "extra"}, False)
    assert await chat.pid() != old_pid
    await wait_for(lambda: not pid_alive(old_pid), timeout_s=30, message="the old server stopped")


async def test_a_crash_is_an_error_result_and_the_server_is_restarted(
    pool: asyncpg.Pool, clients: McpClients
) -> None:
    await stdio_server(pool)
    chat = await chat_with(pool, clients)
    old_pid = await chat.pid()

    crashed = await chat.call("test__crash")
    assert crashed.is_error
    assert "MCP server 'test' closed the connection during the call" in crashed.result

    async def restarted() -> int | None:
        outcome = await chat.call("test__whoami")
        return None if outcome.is_error else int(outcome.result["pid"])

    new_pid = await engine_harness.eventually(
        restarted, timeout_s=60, message="the server restarted"
    )
    assert new_pid != old_pid
    assert not pid_alive(old_pid)


async def test_a_hanging_call_times_out_as_an_error_result(
    pool: asyncpg.Pool, clients: McpClients
) -> None:
    await stdio_server(pool, call_timeout_s=0.5)
    chat = await chat_with(pool, clients)
    hung = await chat.call("test__hang")
    assert hung == ToolOutcome("MCP server 'test' did not answer within 0.5 s", True)
    # The server itself is fine: the next call is answered.
    assert await chat.call("test__add", {"a": 1, "b": 2}) == ToolOutcome({"result": 3.0}, False)


async def test_an_http_server_gets_its_headers_and_its_death_is_an_error_result(
    pool: asyncpg.Pool, clients: McpClients
) -> None:
    async with http_mcp_server() as url:
        await mcp_servers.create_server(
            pool, name="web", transport=mcp_servers.http(url, {"X-Api-Key": "k-123"})
        )
        chat = await chat_with(pool, clients)
        assert {"web__add", "web__header"} <= await chat.names()
        assert await chat.call("web__add", {"a": 1, "b": 2}) == ToolOutcome({"result": 3.0}, False)
        header = await chat.call("web__header", {"name": "x-api-key"})
        assert header == ToolOutcome({"result": "k-123"}, False)
        tools = await chat.tools()  # as a step would hold them while the server dies

    outcome = await tools.call("web__add", {"a": 1, "b": 2}, context(chat.chat_id))
    assert outcome.is_error
    assert outcome.result.startswith("MCP server 'web' ")


async def test_an_unreachable_server_offers_nothing_and_costs_the_step_nothing(
    pool: asyncpg.Pool, clients: McpClients
) -> None:
    # A port nobody listens on: the connection is refused at once.
    async with http_mcp_server() as url:
        pass
    await mcp_servers.create_server(pool, name="gone", transport=mcp_servers.http(url))
    chat = await chat_with(pool, clients)
    assert await chat.names() == STATIC


async def test_an_mcp_tool_whose_name_is_taken_is_refused(
    pool: asyncpg.Pool, clients: McpClients, caplog: pytest.LogCaptureFixture
) -> None:
    async def plugin_add(_args: dict[str, Any], _context: ToolContext) -> str:
        return "the plug-in's"

    static = default_registry()
    static.register(
        Tool("test__add", "a plug-in's tool", {"type": "object"}, plugin_add, source="plug-in 'x'")
    )
    await stdio_server(pool)
    chat = await chat_with(pool, clients, static)
    with caplog.at_level(logging.WARNING, logger="app.tools.toolset"):
        assert "test__whoami" in await chat.names()
    assert await chat.call("test__add") == ToolOutcome("the plug-in's", False)
    clashes = [r.getMessage() for r in caplog.records if "tools.name_clash" in r.getMessage()]
    assert clashes and "MCP server 'test'" in clashes[0] and "plug-in 'x'" in clashes[0]


async def test_a_chat_uses_only_the_servers_it_chose(
    pool: asyncpg.Pool, clients: McpClients
) -> None:
    chosen = await stdio_server(pool, name="one")
    await stdio_server(pool, name="two")
    catalog = ToolCatalog(default_registry(), clients)
    owner = await factories.create_owner(pool)
    only_one, _ = await chats.create_chat(pool, owner, "hi", mcp_server_ids=[chosen.id])
    none, _ = await chats.create_chat(pool, owner, "hi", mcp_server_ids=[])
    names = set((await step_tools(pool, catalog, only_one.id)).registry.names())
    assert names == STATIC | {f"one__{t}" for t in TEST_TOOLS}
    assert set((await step_tools(pool, catalog, none.id)).registry.names()) == STATIC


async def test_closing_stops_the_stdio_servers(pool: asyncpg.Pool) -> None:
    clients = McpClients(connect_timeout_s=60)
    runner = asyncio.create_task(clients.run())
    await stdio_server(pool)
    chat = await chat_with(pool, clients)
    pid = await chat.pid()
    assert pid_alive(pid)

    await clients.close()
    await asyncio.wait({runner}, timeout=30)
    assert runner.done() and runner.exception() is None
    assert not pid_alive(pid)
    # A closed replica's MCP tools answer with an error, never hang.
    assert await chat.names() == STATIC


async def test_a_client_tool_named_like_an_mcp_tool_is_refused(
    pool: asyncpg.Pool, clients: McpClients, caplog: pytest.LogCaptureFixture
) -> None:
    await stdio_server(pool)
    catalog = ToolCatalog(default_registry(), clients)
    owner = await factories.create_owner(pool)
    schema = {"type": "object", "properties": {}}
    chat, _ = await chats.create_chat(
        pool,
        owner,
        "hi",
        tools=[
            {"name": "test__add", "description": "the client's", "input_schema": schema},
            {"name": "pick_file", "description": "the client's", "input_schema": schema},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="app.tools.toolset"):
        tools = await step_tools(pool, catalog, chat.id)
    # The server-side tool runs; the client keeps its other tool.
    assert [spec.name for spec in tools.client] == ["pick_file"]
    assert tools.client_names == {"pick_file"}
    add = tools.registry.get("test__add")
    assert add is not None and add.source == "MCP server 'test'"
    clashes = [r.getMessage() for r in caplog.records if "tools.name_clash" in r.getMessage()]
    assert clashes and "client tool 'test__add'" in clashes[0]
