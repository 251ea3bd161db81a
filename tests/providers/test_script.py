"""The built-in `script` model: `/call <tool> <json>` calls the tool, its result is answered as
`result: ...`, anything else is echoed; through the real chat loop too."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from app.providers.base import (
    ModelConfig,
    ModelRequest,
    PromptMessage,
    StepFinished,
    StreamEvent,
    TextDelta,
    ToolCall,
)
from app.providers.catalog import provider_for
from app.providers.offline import EchoProvider, ScriptProvider
from app.state import chats
from tests import engine_harness, factories
from tests.mcp_harness import SCRIPT_MODEL_CONFIG_ID

CONFIG = ModelConfig(id=SCRIPT_MODEL_CONFIG_ID, provider="builtin", model="script")


def user(text: str) -> PromptMessage:
    return PromptMessage("user", [{"type": "text", "text": text}])


def tool_result(result: Any, *, is_error: bool = False) -> dict[str, Any]:
    return {
        "type": "tool_result",
        "tool_call_id": "call_1",
        "name": "t",
        "result": result,
        "is_error": is_error,
    }


async def step(*messages: PromptMessage) -> list[StreamEvent]:
    request = ModelRequest(config=CONFIG, messages=list(messages))
    return [event async for event in ScriptProvider().stream(request)]


def text(events: list[StreamEvent]) -> str:
    assert isinstance(events[-1], StepFinished) and events[-1].stop_reason == "end_turn"
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_the_script_model_config_gets_the_script_provider() -> None:
    assert isinstance(provider_for(CONFIG, env={}), ScriptProvider)
    echo = ModelConfig(id="e", provider="builtin", model="echo")
    assert isinstance(provider_for(echo, env={}), EchoProvider)


async def test_call_makes_a_tool_call_with_the_arguments() -> None:
    events = await step(user('/call files__read {"path": "/tmp/x", "lines": [1, 2]}'))
    call, finished = events
    assert isinstance(call, ToolCall)
    assert (call.name, call.args) == ("files__read", {"path": "/tmp/x", "lines": [1, 2]})
    assert isinstance(finished, StepFinished) and finished.stop_reason == "tool_use"
    # No arguments: an empty object. The tool need not be offered: the registry answers.
    (bare, _) = await step(user("/call current_time"))
    assert isinstance(bare, ToolCall) and (bare.name, bare.args) == ("current_time", {})


@pytest.mark.parametrize(
    ("message", "answer"),
    [
        ("/call", "script: usage: /call <tool name> <JSON object of arguments>"),
        ("/call add {a: 1}", "script: the arguments are not JSON"),
        ("/call add [1, 2]", "script: the arguments must be a JSON object"),
    ],
)
async def test_a_call_that_cannot_be_made_is_answered_in_words(message: str, answer: str) -> None:
    assert text(await step(user(message))).startswith(answer)


@pytest.mark.parametrize(
    ("result", "is_error", "answer"),
    [
        ("plain text", False, "result: plain text"),
        ({"result": 5.0}, False, 'result: {"result": 5.0}'),
        ([1, "två"], False, 'result: [1, "två"]'),
        (7, False, "result: 7"),
        (
            "MCP server 'x' did not answer within 2 s",
            True,
            "result: error: MCP server 'x' did not answer within 2 s",
        ),
    ],
)
async def test_a_result_is_answered_as_result(result: Any, is_error: bool, answer: str) -> None:
    events = await step(
        user("/call t {}"), PromptMessage("tool", [tool_result(result, is_error=is_error)])
    )
    assert text(events) == answer


async def test_any_other_message_is_echoed() -> None:
    assert text(await step(user("hello  there /call"))) == "echo: hello there /call"


async def test_a_chat_on_script_calls_a_builtin_tool_and_answers_its_result(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    script = uuid.UUID(SCRIPT_MODEL_CONFIG_ID)
    async with engine_harness.running_replica(database_url, pool):
        added, _ = await chats.create_chat(
            pool, owner, '/call add {"a": 2, "b": 3}', model_config_id=script
        )
        unknown, _ = await chats.create_chat(pool, owner, "/call nope {}", model_config_id=script)
        for chat_id in (added.id, unknown.id):
            await engine_harness.wait_status(pool, chat_id, "waiting")
    history = await engine_harness.history(pool, added.id)
    assert [role for role, _ in history] == ["user", "assistant", "tool", "assistant"]
    assert engine_harness.text_of(history[-1][1]) == "result: 5"
    answer = engine_harness.text_of((await engine_harness.history(pool, unknown.id))[-1][1])
    assert answer == "result: error: unknown tool 'nope'"
