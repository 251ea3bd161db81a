"""The sub-agent tools in the running engine: a parent chat, driven by the real Anthropic SDK
against the fake server, spawns two children, waits for both and answers with what they said;
and the tools' refusals reach the model as error results, never as a failed run."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from app.db.listener import Listener
from app.errors import FencedOut
from app.providers.catalog import close_providers
from app.state import chats
from app.state.model import Owner
from app.tools.agent_tools import MAX_WAIT_S
from app.tools.registry import DEFAULT_MAX_CHILDREN, ToolContext, ToolOutcome
from app.tools.toolset import default_registry
from tests import engine_harness, factories
from tests.fakes import running
from tests.fakes.anthropic_server import FakeAnthropicServer, first_user_text, tool_names
from tests.fakes.scenarios import (
    CHILD_NAMES,
    PARENT_PROMPT,
    PARENT_TITLE,
    SubagentScenario,
    chat_of,
    child_answer,
    child_prompt,
    kind_of,
)

SUBAGENT_TOOLS = {"spawn_agent", "wait_agent", "message_agent", "close_agent"}


@pytest.fixture(autouse=True)
async def _close_sdk_clients() -> AsyncIterator[None]:
    yield
    await close_providers()


async def _children(pool: asyncpg.Pool, parent_id: uuid.UUID) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM chats WHERE parent_chat_id = $1 ORDER BY created_at, id", parent_id
    )


async def test_a_parent_spawns_two_children_waits_for_both_and_uses_their_answers(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    scenario = SubagentScenario()
    async with (
        running(FakeAnthropicServer(responder=scenario)) as server,
        engine_harness.running_replica(database_url, pool) as replica,
    ):
        model = await factories.create_fake_model_config(pool, server.base_url)
        parent, _ = await chats.create_chat(pool, owner, PARENT_PROMPT, model_config_id=model)
        await engine_harness.wait_status(pool, parent.id, "waiting")
        children = await _children(pool, parent.id)
        assert len(children) == 2
        for child in children:
            await engine_harness.wait_status(pool, child["id"], "waiting")
        await engine_harness.eventually(
            lambda: _title_is(pool, parent.id, PARENT_TITLE), message="the parent's title"
        )

    # The parent: spawn x2 -> results, wait -> results, final answer quoting both children.
    history = await engine_harness.history(pool, parent.id)
    assert [role for role, _ in history] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    spawn_calls = history[1][1]
    assert [(p["type"], p["name"]) for p in spawn_calls] == [("tool_call", "spawn_agent")] * 2
    spawned = [part["result"]["chat_id"] for part in history[2][1]]
    assert sorted(spawned) == sorted(str(child["id"]) for child in children)
    assert all(part["is_error"] is False for part in history[2][1])
    (wait_call,) = [p for p in history[3][1] if p["type"] == "tool_call"]
    assert (wait_call["name"], wait_call["args"]["chat_ids"]) == ("wait_agent", spawned)
    (wait_result,) = history[4][1]
    assert wait_result["is_error"] is False
    agents = wait_result["result"]["agents"]
    assert [a["chat_id"] for a in agents] == spawned
    assert {a["status"] for a in agents} == {"waiting"}
    final_text = engine_harness.text_of(history[5][1])
    for name in CHILD_NAMES:
        assert child_answer(name) in final_text

    # The children: their own prompt and answer, the parent's model and owner.
    for child in children:
        name = child["title"].removeprefix("helper ")
        assert [
            (r, engine_harness.text_of(c))
            for r, c in await engine_harness.history(pool, child["id"])
        ] == [
            ("user", child_prompt(name)),
            ("assistant", child_answer(name)),
        ]
        assert child["model_config_id"] == model
        assert child["owner_id"] == owner.user_id
        assert child["root_chat_id"] == parent.id

    # Every assistant message recorded its usage (the fake's 25 in / 7 out).
    usage = await pool.fetch(
        """
        SELECT input_tokens, output_tokens FROM chat_messages
        WHERE chat_id = ANY($1) AND role = 'assistant'
        """,
        [parent.id, *(c["id"] for c in children)],
    )
    assert {(row["input_tokens"], row["output_tokens"]) for row in usage} == {(25, 7)}

    # What the model was offered: the parent every sub-agent tool, the children none of them.
    by_kind: dict[str, list[Any]] = {}
    for request in server.requests:
        kind = kind_of(request)
        by_kind.setdefault(chat_of(request) if kind == "step" else kind, []).append(request)
    assert len(by_kind["parent"]) == 3
    assert set(tool_names(by_kind["parent"][0].body)) >= SUBAGENT_TOOLS
    assert len(by_kind["child"]) == 2
    for request in by_kind["child"]:
        assert not SUBAGENT_TOOLS & set(tool_names(request.body))
        assert first_user_text(request.body).startswith("CHILD")
    # Children were spawned with a title: only the parent's title was generated.
    assert len(by_kind["title"]) == 1
    assert replica.stats.run_ends["waiting"] == 3


async def test_stop_of_a_parent_waiting_for_its_children_stops_all_of_them(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    scenario = SubagentScenario(hold_children=asyncio.Event())  # never released
    async with (
        running(FakeAnthropicServer(responder=scenario)) as server,
        engine_harness.running_replica(database_url, pool),
    ):
        model = await factories.create_fake_model_config(pool, server.base_url)
        parent, _ = await chats.create_chat(pool, owner, PARENT_PROMPT, model_config_id=model)

        async def parent_waiting() -> bool:
            parts = await engine_harness.parts_of(pool, parent.id)
            return any(json.loads(p["part"]).get("name") == "wait_agent" for p in parts)

        await engine_harness.eventually(parent_waiting, message="the parent waiting")
        children = [row["id"] for row in await _children(pool, parent.id)]
        for child_id in children:
            await engine_harness.wait_status(pool, child_id, "running")
        await chats.interrupt(pool, owner, parent.id)
        for chat_id in [parent.id, *children]:
            await engine_harness.wait_status(pool, chat_id, "waiting")

    history = await engine_harness.history(pool, parent.id)
    assert [role for role, _ in history] == ["user", "assistant", "tool", "assistant", "tool"]
    (wait_call,) = [p for p in history[3][1] if p["type"] == "tool_call"]
    assert history[4][1] == [
        {
            "type": "tool_result",
            "tool_call_id": wait_call["id"],
            "name": "wait_agent",
            "result": "interrupted",
            "is_error": True,
        }
    ]
    for child_id in children:  # stopped before they answered
        assert [role for role, _ in await engine_harness.history(pool, child_id)] == ["user"]


async def _title_is(pool: asyncpg.Pool, chat_id: uuid.UUID, title: str) -> bool:
    return (await engine_harness.chat_row(pool, chat_id)).title == title


# --- the tools' refusals, called as the runner calls them ----------------------------------


async def _context(
    pool: asyncpg.Pool,
    listener: Listener,
    owner: Owner,
    chat_id: uuid.UUID,
    *,
    max_children: int = DEFAULT_MAX_CHILDREN,
    acquire: bool = True,
) -> ToolContext:
    """The context of a run of the chat. `acquire`: the row is made running for a new worker
    and generation, as an acquire does (nobody else runs it here); else the chat is left as
    it is, for calls that are refused before anything is written."""
    worker_id = uuid.uuid4()
    if acquire:
        row = await pool.fetchrow(
            "UPDATE chats SET status = 'running', worker_id = $2, generation = generation + 1"
            " WHERE id = $1 RETURNING *",
            chat_id,
            worker_id,
        )
    else:
        row = await pool.fetchrow("SELECT * FROM chats WHERE id = $1", chat_id)
    assert row is not None
    return ToolContext(
        chat_id=row["id"],
        worker_id=worker_id,
        generation=row["generation"],
        owner=owner,
        parent_chat_id=row["parent_chat_id"],
        pool=pool,
        listener=listener,
        max_children=max_children,
    )


async def test_sub_agent_tools_report_misuse_as_error_results(
    database_url: str, pool: asyncpg.Pool
) -> None:
    registry = default_registry()
    owner = await factories.create_owner(pool)
    async with engine_harness.running_listener(database_url) as listener:
        parent, _ = await chats.create_chat(pool, owner, "parent")
        other, _ = await chats.create_chat(pool, owner, "someone else's parent")
        as_parent = await _context(pool, listener, owner, parent.id)

        spawned = await registry.call("spawn_agent", {"prompt": "help me"}, as_parent)
        assert not spawned.is_error, spawned.result
        child_id = spawned.result["chat_id"]
        child = await engine_harness.chat_row(pool, uuid.UUID(child_id))
        assert (child.parent_chat_id, child.model_config_id) == (parent.id, parent.model_config_id)
        as_child = await _context(pool, listener, owner, child.id, acquire=False)
        as_other = await _context(pool, listener, owner, other.id, acquire=False)

        async def error_of(name: str, args: dict[str, Any], context: ToolContext) -> str:
            outcome: ToolOutcome = await registry.call(name, args, context)
            assert outcome.is_error, outcome.result
            return str(outcome.result)

        # Children have no sub-agent tools: not offered, and refused if called anyway.
        assert not SUBAGENT_TOOLS & {spec.name for spec in registry.specs(for_child=True)}
        assert {spec.name for spec in registry.specs()} >= SUBAGENT_TOOLS
        assert "not available to sub-agents" in await error_of(
            "spawn_agent", {"prompt": "grandchild"}, as_child
        )
        # A chat reaches only its own children.
        for name, args in [
            ("wait_agent", {"chat_ids": [child_id], "timeout_s": 1}),
            ("message_agent", {"chat_id": child_id, "text": "hi"}),
            ("close_agent", {"chat_id": child_id}),
        ]:
            assert "no sub-agent" in await error_of(name, args, as_other)
        # Malformed arguments.
        assert "not a chat id" in await error_of("close_agent", {"chat_id": "nope"}, as_parent)
        assert "non-empty list" in await error_of("wait_agent", {"chat_ids": []}, as_parent)
        assert "positive" in await error_of(
            "wait_agent", {"chat_ids": [child_id], "timeout_s": -1}, as_parent
        )
        assert "non-empty string" in await error_of("spawn_agent", {"prompt": " "}, as_parent)

        # A wait that runs out says so, with the child's status (nobody runs it here).
        waited = await registry.call(
            "wait_agent", {"chat_id": child_id, "timeout_s": 0.05}, as_parent
        )
        assert not waited.is_error
        assert waited.result == {
            "agents": [{"chat_id": child_id, "status": "pending", "timed_out": True}]
        }

        messaged = await registry.call(
            "message_agent", {"chat_id": child_id, "text": "also this"}, as_parent
        )
        assert messaged.result == {"chat_id": child_id, "queued": True}
        closed = await registry.call("close_agent", {"chat_id": child_id}, as_parent)
        assert closed.result == {"chat_id": child_id, "status": "waiting", "archived": True}
        # A closed (archived) child takes no more messages: the model is told why.
        assert "archived" in await error_of(
            "message_agent", {"chat_id": child_id, "text": "still there?"}, as_parent
        )


def test_the_wait_bound_is_within_the_tool_timeout() -> None:
    wait = default_registry().get("wait_agent")
    assert wait is not None
    assert wait.timeout_s > MAX_WAIT_S
    assert json.loads(json.dumps(wait.input_schema)) == wait.input_schema  # plain JSON


async def test_spawning_over_the_children_limit_is_an_error_result_naming_it(
    database_url: str, pool: asyncpg.Pool
) -> None:
    registry = default_registry()
    owner = await factories.create_owner(pool)
    async with engine_harness.running_listener(database_url) as listener:
        parent, _ = await chats.create_chat(pool, owner, "parent")
        as_parent = await _context(pool, listener, owner, parent.id, max_children=1)

        first = await registry.call("spawn_agent", {"prompt": "one"}, as_parent)
        assert not first.is_error, first.result
        refused = await registry.call("spawn_agent", {"prompt": "two"}, as_parent)
        assert refused.is_error
        assert "max_children_per_chat = 1" in str(refused.result)
        assert len(await _children(pool, parent.id)) == 1

        # Closing a sub-agent makes room for another.
        closed = await registry.call("close_agent", {"chat_id": first.result["chat_id"]}, as_parent)
        assert not closed.is_error, closed.result
        again = await registry.call("spawn_agent", {"prompt": "two"}, as_parent)
        assert not again.is_error, again.result


async def test_a_stale_run_cannot_use_the_sub_agent_tools(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """A run whose chat was re-acquired meanwhile: its tools write nothing, and the run is
    fenced out (FencedOut stops it) instead of telling the model."""
    registry = default_registry()
    owner = await factories.create_owner(pool)
    async with engine_harness.running_listener(database_url) as listener:
        parent, _ = await chats.create_chat(pool, owner, "parent")
        stale = await _context(pool, listener, owner, parent.id)
        spawned = await registry.call("spawn_agent", {"prompt": "one"}, stale)
        child_id = spawned.result["chat_id"]
        await _context(pool, listener, owner, parent.id)  # re-acquired: generation + 1
        before = [dict(row) for row in await _children(pool, parent.id)]

        for name, args in [
            ("spawn_agent", {"prompt": "two"}),
            ("message_agent", {"chat_id": child_id, "text": "more"}),
            ("close_agent", {"chat_id": child_id}),
        ]:
            with pytest.raises(FencedOut):
                await registry.call(name, args, stale)

        assert [dict(row) for row in await _children(pool, parent.id)] == before
        queued = await pool.fetchval(
            "SELECT count(*) FROM chat_queued_messages WHERE chat_id = $1", uuid.UUID(child_id)
        )
        assert queued == 0
