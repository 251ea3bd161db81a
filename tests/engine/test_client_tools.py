"""Client-side tools in the chat loop (app/engine/chatloop.py), with an in-process replica on a
real database: a step that calls a server-side and a client-side tool runs the first and hands
the chat to its client for the second; a Stop during such a step ends the turn with the call
answered "interrupted"; a server-side tool of the same name wins over a client's definition."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from app.engine.step import stream_once
from app.providers.base import (
    ModelRequest,
    Provider,
    StepFinished,
    StreamEvent,
    ToolCall,
    Usage,
)
from app.providers.retry import RetryInfo
from app.state import chats
from app.state.client_tools import INTERRUPTED_RESULT
from tests import engine_harness, factories

LOCATE = {
    "name": "get_location",
    "description": "Where the user is.",
    "input_schema": {"type": "object", "properties": {}},
}


def _two_calls_then_echo(
    offered: list[list[str]], hold: asyncio.Event | None = None
) -> Callable[..., AsyncIterator[StreamEvent]]:
    """A model whose first step calls `add` (server-side) and `get_location` (the client's) at
    once; then the echo model. Records the tool names each step was offered. With `hold`, the
    first step waits for it after the calls (a Stop can arrive meanwhile)."""

    async def fake(
        provider: Provider,
        request: ModelRequest,
        *,
        on_retry: Callable[[RetryInfo], Awaitable[None]],
    ) -> AsyncIterator[StreamEvent]:
        offered.append([tool.name for tool in request.tools])
        if len(offered) == 1:
            yield ToolCall("call_add", "add", {"a": 2, "b": 3})
            yield ToolCall("call_loc", "get_location", {})
            if hold is not None:
                await hold.wait()
            yield StepFinished("tool_use", Usage(10, 5))
            return
        async for event in stream_once(provider, request, on_retry=on_retry):
            yield event

    return fake


async def test_server_calls_run_first_and_the_client_call_waits(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    offered: list[list[str]] = []
    async with engine_harness.running_replica(
        database_url, pool, stream_step=_two_calls_then_echo(offered)
    ) as replica:
        chat, _ = await chats.create_chat(pool, owner, "where am I, and 2 + 3?", tools=[LOCATE])
        waiting = await engine_harness.wait_status(pool, chat.id, "requires_action")
        assert waiting.pending_tool_calls == [
            {"id": "call_loc", "name": "get_location", "args": {}}
        ]
        history = await engine_harness.history(pool, chat.id)
        assert [role for role, _ in history] == ["user", "assistant", "tool"]
        assert [(r["tool_call_id"], r["result"]) for r in history[2][1]] == [("call_add", 5)]
        assert replica.runs == {}

        await chats.submit_tool_results(
            pool, owner, chat.id, [{"tool_call_id": "call_loc", "result": "Lyon"}]
        )
        await engine_harness.wait_status(pool, chat.id, "waiting")
    history = await engine_harness.history(pool, chat.id)
    assert [role for role, _ in history] == ["user", "assistant", "tool", "tool", "assistant"]
    assert engine_harness.text_of(history[-1][1]) == 'echo: get_location returned "Lyon"'
    assert "get_location" in offered[0] and "add" in offered[0]
    assert replica.stats.run_ends == {"requires_action": 1, "waiting": 1}


async def test_a_stop_during_the_step_answers_the_client_call_interrupted(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    hold = asyncio.Event()
    offered: list[list[str]] = []
    async with engine_harness.running_replica(
        database_url, pool, stream_step=_two_calls_then_echo(offered, hold)
    ):
        chat, _ = await chats.create_chat(pool, owner, "where am I?", tools=[LOCATE])
        await engine_harness.wait_parts(pool, chat.id, at_least=2)  # both calls are live
        await chats.interrupt(pool, owner, chat.id)
        final = await engine_harness.wait_status(pool, chat.id, "waiting")
    assert final.pending_tool_calls is None
    history = await engine_harness.history(pool, chat.id)
    assert [role for role, _ in history] == ["user", "assistant", "tool"]
    results = {r["tool_call_id"]: (r["result"], r["is_error"]) for r in history[2][1]}
    assert results["call_loc"] == (INTERRUPTED_RESULT, True)


async def test_a_server_tool_wins_over_a_client_definition_of_its_name(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """The API refuses such a definition; one that got in anyway (a plug-in registered the name
    later) is not offered, and a call of the name runs the server's tool."""
    owner = await factories.create_owner(pool)
    shadow = {"name": "add", "description": "the client's add", "input_schema": {"type": "object"}}
    offered: list[list[str]] = []

    async def recording(
        provider: Provider,
        request: ModelRequest,
        *,
        on_retry: Callable[[RetryInfo], Awaitable[None]],
    ) -> AsyncIterator[StreamEvent]:
        offered.append([tool.name for tool in request.tools])
        async for event in stream_once(provider, request, on_retry=on_retry):
            yield event

    async with engine_harness.running_replica(database_url, pool, stream_step=recording):
        chat, _ = await chats.create_chat(pool, owner, '/tool add {"a": 1, "b": 1}', tools=[shadow])
        await engine_harness.wait_status(pool, chat.id, "waiting")
    assert offered[0].count("add") == 1
    history = await engine_harness.history(pool, chat.id)
    assert engine_harness.text_of(history[-1][1]) == "echo: add returned 2"
