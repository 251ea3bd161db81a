"""The MCP server registry (app/state/mcp_servers.py): secrets kept when a redacted value comes
back, versions, and which servers a chat's runs use."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from app.errors import Conflict, NotFound, ValidationFailed
from app.state import chats, mcp_servers, runs
from app.state.admin import REDACTED
from app.state.mcp_servers import McpServerChanges
from tests import factories


async def stored_transport(pool: asyncpg.Pool, server_id: uuid.UUID) -> dict[str, object]:
    raw = await pool.fetchval("SELECT transport FROM mcp_servers WHERE id = $1", server_id)
    return dict(json.loads(raw))


async def test_env_and_header_values_are_stored_and_never_shown(pool: asyncpg.Pool) -> None:
    server = await mcp_servers.create_server(
        pool, name="files", transport=mcp_servers.stdio("srv", ["--x"], {"TOKEN": "t0p"})
    )
    assert server.to_json()["transport"] == {
        "type": "stdio",
        "command": "srv",
        "args": ["--x"],
        "env": {"TOKEN": REDACTED},
    }
    assert (await stored_transport(pool, server.id))["env"] == {"TOKEN": "t0p"}
    web = await mcp_servers.create_server(
        pool, name="web", transport=mcp_servers.http("https://h/mcp", {"Authorization": "B x"})
    )
    assert web.to_json()["transport"]["headers"] == {"Authorization": REDACTED}
    assert "t0p" not in json.dumps([s.to_json() for s in await mcp_servers.list_servers(pool)])


async def test_a_redacted_value_sent_back_keeps_the_stored_one(pool: asyncpg.Pool) -> None:
    server = await mcp_servers.create_server(
        pool,
        name="files",
        transport=mcp_servers.stdio("srv", env={"TOKEN": "t0p", "REGION": "eu"}),
    )
    changed = mcp_servers.stdio("srv2", env={"TOKEN": REDACTED, "REGION": "us", "NEW": "n"})
    updated = await mcp_servers.update_server(pool, server.id, McpServerChanges(transport=changed))
    assert updated.version == server.version + 1
    assert await stored_transport(pool, server.id) == {
        "type": "stdio",
        "command": "srv2",
        "args": [],
        "env": {"TOKEN": "t0p", "REGION": "us", "NEW": "n"},
    }
    # A value of that name must be stored, and of the same transport type.
    for transport in (
        mcp_servers.stdio("srv", env={"OTHER": REDACTED}),
        mcp_servers.http("https://h/mcp", {"TOKEN": REDACTED}),
    ):
        with pytest.raises(ValidationFailed, match="no value of that name is stored"):
            await mcp_servers.update_server(pool, server.id, McpServerChanges(transport=transport))
    # A new server has nothing stored: the marker is refused.
    with pytest.raises(ValidationFailed, match="send the real value"):
        await mcp_servers.create_server(
            pool, name="other", transport=mcp_servers.http("https://h", {"X": REDACTED})
        )


async def test_patch_changes_only_what_it_names(pool: asyncpg.Pool) -> None:
    server = await mcp_servers.create_server(
        pool,
        name="files",
        transport=mcp_servers.stdio("srv"),
        allow_tools=("read",),
        deny_tools=("write",),
        call_timeout_s=5.0,
    )
    renamed = await mcp_servers.update_server(pool, server.id, McpServerChanges(name="docs"))
    assert (renamed.name, renamed.allow_tools, renamed.deny_tools, renamed.call_timeout_s) == (
        "docs",
        ("read",),
        ("write",),
        5.0,
    )
    cleared = await mcp_servers.update_server(
        pool, server.id, McpServerChanges(allow_tools=None, call_timeout_s=None)
    )
    assert (cleared.allow_tools, cleared.call_timeout_s, cleared.version) == (None, None, 3)
    assert cleared.offers("anything") and not cleared.offers("write")


async def test_names_are_unique_and_unknown_ids_are_not_found(pool: asyncpg.Pool) -> None:
    first = await mcp_servers.create_server(pool, name="a", transport=mcp_servers.stdio("x"))
    second = await mcp_servers.create_server(pool, name="b", transport=mcp_servers.stdio("x"))
    with pytest.raises(Conflict):
        await mcp_servers.create_server(pool, name="a", transport=mcp_servers.stdio("x"))
    with pytest.raises(Conflict):
        await mcp_servers.update_server(pool, second.id, McpServerChanges(name="a"))
    with pytest.raises(NotFound):
        await mcp_servers.update_server(pool, uuid.uuid4(), McpServerChanges(enabled=False))
    await mcp_servers.delete_server(pool, first.id)
    with pytest.raises(NotFound):
        await mcp_servers.delete_server(pool, first.id)


async def test_a_chat_uses_the_servers_it_chose_or_every_enabled_one(pool: asyncpg.Pool) -> None:
    one = await mcp_servers.create_server(pool, name="one", transport=mcp_servers.stdio("x"))
    two = await mcp_servers.create_server(pool, name="two", transport=mcp_servers.stdio("x"))
    off = await mcp_servers.create_server(
        pool, name="off", transport=mcp_servers.stdio("x"), enabled=False
    )
    owner = await factories.create_owner(pool)
    every, _ = await chats.create_chat(pool, owner, "hi")
    chosen, _ = await chats.create_chat(pool, owner, "hi", mcp_server_ids=[two.id, off.id, two.id])
    nothing, _ = await chats.create_chat(pool, owner, "hi", mcp_server_ids=[])

    async def names(chat_id: uuid.UUID) -> list[str]:
        return await _servers_of_step(pool, chat_id)

    assert await names(every.id) == ["one", "two"]
    assert await names(chosen.id) == ["two"]
    assert await names(nothing.id) == []
    stored = await pool.fetchval("SELECT mcp_server_ids FROM chats WHERE id = $1", chosen.id)
    assert stored == [two.id, off.id]

    # Enabled later: offered. A server added later joins the chats that chose none.
    await mcp_servers.update_server(pool, off.id, McpServerChanges(enabled=True))
    three = await mcp_servers.create_server(pool, name="three", transport=mcp_servers.stdio("x"))
    assert await names(chosen.id) == ["off", "two"]
    assert await names(every.id) == ["off", "one", "three", "two"]
    # A deleted server is skipped.
    await mcp_servers.delete_server(pool, two.id)
    assert await names(chosen.id) == ["off"]
    assert three.id != one.id


async def test_unknown_server_ids_are_refused_and_nothing_is_created(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    missing = uuid.uuid4()
    with pytest.raises(ValidationFailed) as raised:
        await chats.create_chat(pool, owner, "hi", mcp_server_ids=[missing])
    assert raised.value.validations == [
        {"field": "mcp_server_ids", "detail": f"no MCP server {missing}"}
    ]
    assert await pool.fetchval("SELECT count(*) FROM chats") == 0


async def test_a_sub_agent_inherits_its_parents_servers(pool: asyncpg.Pool) -> None:
    one = await mcp_servers.create_server(pool, name="one", transport=mcp_servers.stdio("x"))
    await mcp_servers.create_server(pool, name="two", transport=mcp_servers.stdio("x"))
    owner = await factories.create_owner(pool)
    parent, _ = await chats.create_chat(pool, owner, "hi", mcp_server_ids=[one.id])
    # The parent's choice outlives the server it names.
    await mcp_servers.delete_server(pool, one.id)
    child, _ = await chats.create_chat(pool, owner, "task", parent_chat_id=parent.id)
    stored = await pool.fetchval("SELECT mcp_server_ids FROM chats WHERE id = $1", child.id)
    assert stored == [one.id]
    assert await _servers_of_step(pool, child.id) == []


async def _servers_of_step(pool: asyncpg.Pool, chat_id: uuid.UUID) -> list[str]:
    """The names of the servers a run of the chat uses, as its next step reads them."""
    context = await runs.step_context(pool, chat_id)
    assert context is not None
    return [server.name for server in context.mcp_servers]
