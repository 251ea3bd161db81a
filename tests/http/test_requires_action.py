"""Client-side tools through the HTTP API, with an in-process replica on the same database: a
chat calls its client's tool, waits in requires_action (seen by a stream watcher and by the
chat-list watch), the client posts the results and the turn completes; the time-out and Stop
end the wait with error results; late and malformed answers are refused and change nothing
(docs/requires_action.md)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.http.models import (
    ActionRequiredEvent,
    ChatListChangeEvent,
    ChatOut,
    ClientToolDefinition,
    ToolResultsAnswer,
)
from app.state.client_tools import ASK_USER_QUESTION_TOOL, INTERRUPTED_RESULT, TIMED_OUT_RESULT
from app.tools.toolset import default_registry
from tests import engine_harness, factories
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, StreamReader, api_instance, call, open_sse

LOCATE = {
    "name": "get_location",
    "description": "Where the user is.",
    "input_schema": {"type": "object", "properties": {"precise": {"type": "boolean"}}},
}
LOCATE_ME = '/tool get_location {"precise": true}'


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    names = default_registry().names()
    async with api_instance(database_url, server_tool_names=names, queue_limit=5) as instance:
        yield instance


@pytest.fixture
async def user(api: ApiInstance) -> ApiUser:
    return await factories.create_api_user(api.pool, name="alice")


async def _create(api: ApiInstance, user: ApiUser, text: str, tools: list[Any]) -> uuid.UUID:
    status, chat = await call(api, user, "POST", "/api/v1/chats", {"content": text, "tools": tools})
    assert status == 201, chat
    return uuid.UUID(chat["id"])


async def _state(api: ApiInstance, chat_id: uuid.UUID) -> tuple[object, ...]:
    """What an answer could change: the row and the history."""
    row = await api.pool.fetchrow(
        "SELECT status, version, pending_tool_calls FROM chats WHERE id = $1", chat_id
    )
    assert row is not None
    return (*row.values(), await engine_harness.history(api.pool, chat_id))


def _is_status(status: str) -> Any:
    return lambda e: e.event == "status" and e.json()["status"] == status


async def _pending(api: ApiInstance, chat_id: uuid.UUID) -> list[dict[str, Any]]:
    chat = await engine_harness.wait_status(api.pool, chat_id, "requires_action")
    assert chat.pending_tool_calls is not None
    return chat.pending_tool_calls


async def test_a_client_tool_round_trip_through_the_api(
    api: ApiInstance, user: ApiUser, database_url: str
) -> None:
    async with (
        engine_harness.running_replica(database_url, api.pool) as replica,
        api.client.get("/api/v1/chats/watch", headers=user.headers) as watch_response,
    ):
        watch = StreamReader(watch_response)
        chat_id = await _create(api, user, LOCATE_ME, [LOCATE])
        async with open_sse(api, user, chat_id) as stream:
            action = await stream.until(lambda e: e.event == "action_required", timeout_s=15)
            event = ActionRequiredEvent.model_validate(action.json())
            (pending,) = action.json()["pending_tool_calls"]
            assert (pending["name"], pending["args"]) == ("get_location", {"precise": True})
            assert event.action_deadline_at is not None
            # The step came first, then the status, then the calls.
            kinds = [e.event for e in stream.events]
            assert kinds[-3:] == ["message", "status", "action_required"]
            assert stream.events[-2].json()["status"] == "requires_action"
            listed = await watch.until(lambda e: e.json().get("status") == "requires_action")
            ChatListChangeEvent.model_validate(listed.json())

            status, chat = await call(api, user, "GET", f"/api/v1/chats/{chat_id}")
            assert status == 200
            ChatOut.model_validate(chat)
            assert chat["pending_tool_calls"] == [pending]
            status, page = await call(api, user, "GET", "/api/v1/chats?status=requires_action")
            assert [c["id"] for c in page["chats"]] == [str(chat_id)]
            assert replica.stats.run_ends["requires_action"] == 1
            assert replica.runs == {}  # the slot is free

            status, answer = await call(
                api,
                user,
                "POST",
                f"/api/v1/chats/{chat_id}/tool-results",
                {"results": [{"tool_call_id": pending["id"], "result": {"city": "Lyon"}}]},
            )
            assert status == 200, answer
            ToolResultsAnswer.model_validate(answer)
            assert answer["chat"]["status"] == "pending"
            assert answer["chat"]["pending_tool_calls"] is None
            await stream.until(_is_status("waiting"), timeout_s=15)
        await watch.until(lambda e: e.json().get("status") == "waiting")

    history = await engine_harness.history(api.pool, chat_id)
    assert [role for role, _ in history] == ["user", "assistant", "tool", "assistant"]
    assert history[2][1] == [
        {
            "type": "tool_result",
            "tool_call_id": pending["id"],
            "name": "get_location",
            "result": {"city": "Lyon"},
            "is_error": False,
        }
    ]
    answer_text = engine_harness.text_of(history[3][1])
    assert answer_text == 'echo: get_location returned {"city": "Lyon"}'


async def test_ask_user_question_is_an_ordinary_requires_action(
    api: ApiInstance, user: ApiUser, database_url: str
) -> None:
    status, definition = await call(api, user, "GET", "/api/v1/tools/ask_user_question")
    assert status == 200
    assert ClientToolDefinition.model_validate(definition).name == "ask_user_question"
    assert definition == ASK_USER_QUESTION_TOOL
    question = {"question": "Which color?", "choices": ["red", "blue"]}
    async with engine_harness.running_replica(database_url, api.pool):
        chat_id = await _create(
            api, user, f"/tool ask_user_question {json.dumps(question)}", [definition]
        )
        (pending,) = await _pending(api, chat_id)
        assert (pending["name"], pending["args"]) == ("ask_user_question", question)
        status, _ = await call(
            api,
            user,
            "POST",
            f"/api/v1/chats/{chat_id}/tool-results",
            {"results": [{"tool_call_id": pending["id"], "result": {"answer": "blue"}}]},
        )
        assert status == 200
        await engine_harness.wait_status(api.pool, chat_id, "waiting")
    history = await engine_harness.history(api.pool, chat_id)
    assert engine_harness.text_of(history[-1][1]) == (
        'echo: ask_user_question returned {"answer": "blue"}'
    )


async def test_the_time_out_answers_with_errors_and_a_late_answer_is_refused(
    api: ApiInstance, user: ApiUser, database_url: str
) -> None:
    async with engine_harness.running_replica(
        database_url, api.pool, requires_action_timeout_s=0.5
    ):
        chat_id = await _create(api, user, LOCATE_ME, [LOCATE])
        final = await engine_harness.wait_status(api.pool, chat_id, "waiting")
    assert final.pending_tool_calls is None
    history = await engine_harness.history(api.pool, chat_id)
    assert [role for role, _ in history] == ["user", "assistant", "tool"]
    (result,) = history[2][1]
    assert (result["result"], result["is_error"]) == (TIMED_OUT_RESULT, True)

    before = await _state(api, chat_id)
    status, body = await call(
        api,
        user,
        "POST",
        f"/api/v1/chats/{chat_id}/tool-results",
        {"results": [{"tool_call_id": result["tool_call_id"], "result": "too late"}]},
    )
    assert status == 409 and "waits for no tool results" in body["message"]
    assert await _state(api, chat_id) == before


async def test_stop_ends_the_wait_with_interrupted_results(
    api: ApiInstance, user: ApiUser, database_url: str
) -> None:
    async with engine_harness.running_replica(database_url, api.pool):
        chat_id = await _create(api, user, LOCATE_ME, [LOCATE])
        (pending,) = await _pending(api, chat_id)
        async with open_sse(api, user, chat_id) as stream:
            await stream.until(lambda e: e.event == "action_required")
            status, chat = await call(api, user, "POST", f"/api/v1/chats/{chat_id}/interrupt")
            assert (status, chat["status"], chat["pending_tool_calls"]) == (200, "waiting", None)
            await stream.until(_is_status("waiting"))
        before = await _state(api, chat_id)
        status, _ = await call(
            api,
            user,
            "POST",
            f"/api/v1/chats/{chat_id}/tool-results",
            {"results": [{"tool_call_id": pending["id"], "result": "here"}]},
        )
        assert status == 409
        assert await _state(api, chat_id) == before
    history = await engine_harness.history(api.pool, chat_id)
    assert [role for role, _ in history] == ["user", "assistant", "tool"]
    (result,) = history[2][1]
    assert (result["result"], result["is_error"]) == (INTERRUPTED_RESULT, True)


async def test_a_late_answer_for_an_earlier_turn_is_refused(
    api: ApiInstance, user: ApiUser, database_url: str
) -> None:
    async with engine_harness.running_replica(database_url, api.pool):
        chat_id = await _create(api, user, LOCATE_ME, [LOCATE])
        (first,) = await _pending(api, chat_id)
        answer = {"results": [{"tool_call_id": first["id"], "result": "Lyon"}]}
        status, _ = await call(api, user, "POST", f"/api/v1/chats/{chat_id}/tool-results", answer)
        assert status == 200
        await engine_harness.wait_status(api.pool, chat_id, "waiting")
        status, _ = await call(
            api, user, "POST", f"/api/v1/chats/{chat_id}/messages", {"content": LOCATE_ME}
        )
        assert status == 201
        (second,) = await _pending(api, chat_id)
        assert second["id"] != first["id"]

        before = await _state(api, chat_id)
        status, body = await call(
            api, user, "POST", f"/api/v1/chats/{chat_id}/tool-results", answer
        )
        assert status == 409 and "not pending" in body["message"]
        assert first["id"] in body["detail"]
        assert await _state(api, chat_id) == before


async def test_bad_tool_definitions_and_answers_are_4xx_and_change_nothing(
    api: ApiInstance, user: ApiUser
) -> None:
    bad_tools: list[Any] = [
        [{"name": "has space", "input_schema": {"type": "object"}}],
        [{"name": "x" * 65, "input_schema": {"type": "object"}}],
        [{"name": "twice", "input_schema": {"type": "object"}}] * 2,
        [{"name": "no_schema"}],
        [{"name": "array_schema", "input_schema": {"type": "array"}}],
        [{"name": "bad_required", "input_schema": {"type": "object", "required": [1]}}],
        [{"name": "t", "input_schema": {"type": "object"}, "handler": "x"}],
        [{"name": f"t{i}", "input_schema": {"type": "object"}} for i in range(65)],
        [{"name": "add", "input_schema": {"type": "object"}}],  # a server-side tool
        {"name": "not_a_list"},
    ]
    for tools in bad_tools:
        status, body = await call(
            api, user, "POST", "/api/v1/chats", {"content": "hi", "tools": tools}
        )
        assert status == 400, (tools, body)
        assert body["message"]
    assert await api.pool.fetchval("SELECT count(*) FROM chats") == 0

    # No replica here: the chat is put in requires_action by hand, as a run would.
    chat_id = await _create(api, user, "hi", [LOCATE])
    for tools in bad_tools:
        status, body = await call(
            api, user, "POST", f"/api/v1/chats/{chat_id}/messages", {"content": "x", "tools": tools}
        )
        assert status == 400, (tools, body)
    calls = [
        {"id": "call_a", "name": "get_location", "args": {}},
        {"id": "call_b", "name": "get_location", "args": {}},
    ]
    await api.pool.execute(
        "UPDATE chats SET status = 'requires_action', pending_tool_calls = $2::jsonb,"
        " action_deadline_at = now() + interval '1 hour' WHERE id = $1",
        chat_id,
        json.dumps(calls),
    )
    path = f"/api/v1/chats/{chat_id}/tool-results"
    one = {"tool_call_id": "call_a", "result": 1}
    other = {"tool_call_id": "call_b", "result": 2}
    answers: list[tuple[Any, int]] = [
        ({"results": [one]}, 400),  # call_b unanswered
        ({"results": [one, one, other]}, 400),  # call_a twice
        ({"results": [one, other, {"tool_call_id": "call_z", "result": 3}]}, 409),
        ({"results": []}, 400),
        ({"results": [{"tool_call_id": "call_a"}, other]}, 400),
        ({"results": [one | {"is_error": "yes"}, other]}, 400),
        ({"results": [one | {"extra": 1}, other]}, 400),
        ({"results": [one | {"result": "\u0000"}, other]}, 400),
        ({"answers": [one, other]}, 400),
    ]
    before = await _state(api, chat_id)
    for body, expected in answers:
        status, answer = await call(api, user, "POST", path, body)
        assert status == expected, (body, answer)
        assert answer["message"]
    mallory = await factories.create_api_user(api.pool, name="mallory")
    status, _ = await call(api, mallory, "POST", path, {"results": [one, other]})
    assert status == 404
    status, _ = await call(
        api, user, "POST", f"/api/v1/chats/{uuid.uuid4()}/tool-results", {"results": [one]}
    )
    assert status == 404
    assert await _state(api, chat_id) == before
    # The right answer is taken once.
    status, _ = await call(api, user, "POST", path, {"results": [other, one]})
    assert status == 200
    status, _ = await call(api, user, "POST", path, {"results": [other, one]})
    assert status == 409
