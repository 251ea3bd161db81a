"""The Vercel AI SDK routes (docs/api.md, "Vercel AI SDK") over real HTTP against a real
database, with the worker simulated by the state machine's own run transitions: the UI message
stream of a turn, resume, regenerate, queueing while busy, Stop, and what is refused.

The same routes driven by the real `ai` package across real replicas: tests/e2e/
test_ai_sdk_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from app.http.models import UIMessageChunk
from app.state import runs
from app.state.runs import RunToken, StepRecord
from tests import factories
from tests.conditions import wait_for
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, SimulatedWorker, api_instance, call, new_chat_id

API = "/api/v1/ai-sdk/chats"


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url, queue_limit=3) as instance:
        yield instance


@pytest.fixture
async def alice(api: ApiInstance) -> ApiUser:
    return await factories.create_api_user(api.pool, name="alice")


def body(
    chat_id: uuid.UUID | str,
    text: str = "hello there",
    *,
    trigger: str = "submit-message",
    history: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What `DefaultChatTransport` posts: the client's whole history, its new message last."""
    message = {"id": "m-new", "role": "user", "parts": [{"type": "text", "text": text}]}
    return {
        "id": str(chat_id),
        "messages": [*(history or []), message],
        "trigger": trigger,
        **extra,
    }


@dataclass
class UIStream:
    """A UI message stream as the AI SDK reads it: the JSON of each `data:` line, until
    `data: [DONE]` (or the end of the connection)."""

    response: aiohttp.ClientResponse
    chunks: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False  # `[DONE]` was read
    _buffer: str = ""

    async def next(self, timeout_s: float = 10.0) -> dict[str, Any] | None:
        async with asyncio.timeout(timeout_s):
            while "\n\n" not in self._buffer:
                data = await self.response.content.readany()
                if not data:
                    return None
                self._buffer += data.decode()
        event, self._buffer = self._buffer.split("\n\n", 1)
        lines = [line[len("data: ") :] for line in event.split("\n") if line.startswith("data: ")]
        if not lines:
            return await self.next(timeout_s)  # a keep-alive comment
        if lines[0] == "[DONE]":
            self.finished = True
            return None
        chunk: dict[str, Any] = json.loads(lines[0])
        UIMessageChunk.model_validate(chunk)  # a type the document declares
        self.chunks.append(chunk)
        return chunk

    async def until(self, kind: str, timeout_s: float = 10.0) -> dict[str, Any]:
        while True:
            chunk = await self.next(timeout_s)
            assert chunk is not None, f"the stream ended before a {kind} chunk: {self.chunks}"
            if chunk["type"] == kind:
                return chunk

    async def until_text(self, text: str, timeout_s: float = 10.0) -> None:
        while self.text != text:
            assert await self.next(timeout_s) is not None, (text, self.chunks)

    async def to_end(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        while await self.next(timeout_s) is not None:
            pass
        assert self.finished, f"the stream ended without [DONE]: {self.chunks}"
        return self.chunks

    @property
    def types(self) -> list[str]:
        return [chunk["type"] for chunk in self.chunks]

    @property
    def text(self) -> str:
        return "".join(c["delta"] for c in self.chunks if c["type"] == "text-delta")


@pytest.fixture
async def post(api: ApiInstance) -> AsyncIterator[Any]:
    """POST to the AI SDK route as `user`; the stream (the test reads it) or the JSON error."""
    async with contextlib.AsyncExitStack() as stack:

        async def post_as(user: ApiUser, payload: Any) -> UIStream:
            response = await stack.enter_async_context(
                api.client.post(API, json=payload, headers=user.headers)
            )
            assert response.status == 200, await response.text()
            assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
            assert response.headers["Content-Type"].startswith("text/event-stream")
            return UIStream(response)

        yield post_as


async def _refused(api: ApiInstance, user: ApiUser, payload: Any) -> tuple[int, Any]:
    return await call(api, user, "POST", API, payload)


async def _messages(api: ApiInstance, user: ApiUser, chat_id: uuid.UUID) -> dict[str, Any]:
    status, page = await call(api, user, "GET", f"/api/v1/chats/{chat_id}/messages")
    assert status == 200, page
    return dict(page)


def _token(worker: SimulatedWorker) -> RunToken:
    return RunToken(worker.chat_id, worker.worker_id, worker.generation)


async def _end_turn(worker: SimulatedWorker, text: str, *, interrupted: bool = False) -> None:
    """The turn's last step and the end of the turn, as the engine writes them."""
    step = StepRecord(assistant_content=[{"type": "text", "text": text}])
    await runs.end_turn(worker.pool, _token(worker), interrupted=interrupted, step=step)


# --------------------------------------------------------------------------------------------
# A turn.


async def test_a_first_message_creates_the_chat_under_the_clients_id_and_streams_its_answer(
    api: ApiInstance, alice: ApiUser, post: Any
) -> None:
    chat_id = uuid.uuid4()
    stream = await post(alice, body(chat_id, "hello there", history=[]))
    start = await stream.until("start")

    status, chat = await call(api, alice, "GET", f"/api/v1/chats/{chat_id}")
    assert status == 200 and chat["owner_id"] == str(alice.id)
    [user_message] = (await _messages(api, alice, chat_id))["messages"]
    assert user_message["content"] == [{"type": "text", "text": "hello there"}]
    assert start == {"type": "start", "messageId": f"answer-{user_message['id']}"}

    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    await worker.parts("echo:", " hello")
    await stream.until("text-delta")
    await _end_turn(worker, "echo: hello there")  # the last delta is only in the message
    chunks = await stream.to_end()

    text_id = chunks[2]["id"]
    assert chunks == [
        {"type": "start", "messageId": f"answer-{user_message['id']}"},
        {"type": "start-step"},
        {"type": "text-start", "id": text_id},
        {"type": "text-delta", "id": text_id, "delta": "echo:"},
        {"type": "text-delta", "id": text_id, "delta": " hello"},
        {"type": "text-delta", "id": text_id, "delta": " there"},
        {"type": "text-end", "id": text_id},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
    ]
    answer = (await _messages(api, alice, chat_id))["messages"][-1]
    assert answer["content"] == [{"type": "text", "text": stream.text}]


async def test_a_message_to_an_idle_chat_is_sent_and_extra_fields_are_ignored(
    api: ApiInstance, alice: ApiUser, post: Any
) -> None:
    chat_id = await new_chat_id(api, alice, "first")  # a chat made by the REST API
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    await _end_turn(worker, "echo: first")
    history = [
        {"id": "a", "role": "user", "parts": [{"type": "text", "text": "first"}]},
        {
            "id": "b",
            "role": "assistant",
            "parts": [{"type": "step-start"}, {"type": "text", "text": "echo: first"}],
        },
    ]
    payload = body(chat_id, "second", history=history, messageId=None, metadata={"x": 1})
    payload["messages"][-1]["parts"] = [
        {"type": "step-start"},
        {"type": "text", "text": "sec", "state": "done"},
        {"type": "data-note", "data": {"ignored": True}},
        {"type": "text", "text": "ond"},
    ]
    payload["chatd_extra"] = {"the": "transport's body option"}
    stream = await post(alice, payload)
    await stream.until("start")
    messages = (await _messages(api, alice, chat_id))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[-1]["content"] == [
        {"type": "text", "text": "sec"},
        {"type": "text", "text": "ond"},
    ]
    _, chat = await call(api, alice, "GET", f"/api/v1/chats/{chat_id}")
    assert chat["status"] == "pending"


async def test_tool_calls_reasoning_and_a_second_step(
    api: ApiInstance, alice: ApiUser, post: Any
) -> None:
    chat_id = uuid.uuid4()
    stream = await post(alice, body(chat_id, "/tool clock {}"))
    await stream.until("start")
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    call_part = {"type": "tool_call", "id": "call_1", "name": "clock", "args": {"tz": "UTC"}}
    result = {
        "type": "tool_result",
        "tool_call_id": "call_1",
        "name": "clock",
        "result": {"now": "noon"},
        "is_error": False,
    }
    async with api.pool.acquire() as conn:
        await factories.create_stream_part(
            conn,
            chat_id=chat_id,
            generation=worker.generation,
            part={"type": "reasoning", "text": "I should look"},
        )
        await factories.create_stream_part(
            conn, chat_id=chat_id, generation=worker.generation, part=call_part
        )
    await stream.until("tool-input-available")
    step = StepRecord(
        assistant_content=[{"type": "reasoning", "text": "I should look"}, call_part],
        tool_results=[result],
    )
    await runs.persist_step(api.pool, _token(worker), step, model_config_id=None)
    await stream.until("finish-step")
    await worker.parts("echo: clock returned")
    await stream.until("text-delta")
    await _end_turn(worker, 'echo: clock returned {"now": "noon"}')
    chunks = await stream.to_end()

    reasoning_id = chunks[2]["id"]
    text_id = next(c["id"] for c in chunks if c["type"] == "text-start")
    assert chunks[1:] == [
        {"type": "start-step"},
        {"type": "reasoning-start", "id": reasoning_id},
        {"type": "reasoning-delta", "id": reasoning_id, "delta": "I should look"},
        {"type": "reasoning-end", "id": reasoning_id},
        {
            "type": "tool-input-available",
            "toolCallId": "call_1",
            "toolName": "clock",
            "input": {"tz": "UTC"},
            "dynamic": True,
        },
        {
            "type": "tool-output-available",
            "toolCallId": "call_1",
            "output": {"now": "noon"},
            "dynamic": True,
        },
        {"type": "finish-step"},
        {"type": "start-step"},
        {"type": "text-start", "id": text_id},
        {"type": "text-delta", "id": text_id, "delta": "echo: clock returned"},
        {"type": "text-delta", "id": text_id, "delta": ' {"now": "noon"}'},
        {"type": "text-end", "id": text_id},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
    ]


async def test_a_failed_turn_ends_with_an_error_chunk(
    api: ApiInstance, alice: ApiUser, post: Any
) -> None:
    chat_id = uuid.uuid4()
    stream = await post(alice, body(chat_id))
    await stream.until("start")
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    await worker.finish("error", {"message": "the provider refused", "kind": "invalid_request"})
    chunks = await stream.to_end()
    assert chunks[-1] == {"type": "error", "errorText": "the provider refused"}


# --------------------------------------------------------------------------------------------
# Stop, resume, regenerate, the queue.


async def test_stop_ends_the_stream_with_abort_after_the_partial_answer(
    api: ApiInstance, alice: ApiUser, post: Any
) -> None:
    chat_id = uuid.uuid4()
    stream = await post(alice, body(chat_id))
    await stream.until("start")
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    await worker.parts("echo:", " hel")
    await stream.until("text-delta")
    status, _ = await call(api, alice, "POST", f"/api/v1/chats/{chat_id}/interrupt")
    assert status == 200
    # The run writes what it has, and the chat goes waiting with the Stop mark cleared: the
    # chat's stream shows an ordinary end of a turn.
    await _end_turn(worker, "echo: hel", interrupted=True)
    chunks = await stream.to_end()
    assert [c["type"] for c in chunks[-3:]] == ["text-end", "finish-step", "abort"]
    assert "finish" not in stream.types
    assert stream.text == "echo: hel"


async def test_resume_replays_the_answer_in_progress_from_its_start_then_goes_on_live(
    api: ApiInstance, alice: ApiUser
) -> None:
    chat_id = await new_chat_id(api, alice, "one two three")
    [question] = (await _messages(api, alice, chat_id))["messages"]
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    await worker.parts("echo:", " one")
    async with api.client.get(f"{API}/{chat_id}/stream", headers=alice.headers) as response:
        assert response.status == 200
        assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
        stream = UIStream(response)
        assert await stream.next() == {"type": "start", "messageId": f"answer-{question['id']}"}
        await stream.until_text("echo: one")  # the replay of what was streamed so far
        await worker.parts(" two")
        await _end_turn(worker, "echo: one two three")
        await stream.to_end()
    assert stream.text == "echo: one two three"
    assert stream.types[-1] == "finish"


async def test_resume_answers_204_when_the_chat_is_not_busy_and_404_when_it_is_not_yours(
    api: ApiInstance, alice: ApiUser
) -> None:
    bob = await factories.create_api_user(api.pool, name="bob")
    chat_id = await new_chat_id(api, alice)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    await _end_turn(worker, "echo: hello")
    async with api.client.get(f"{API}/{chat_id}/stream", headers=alice.headers) as response:
        assert response.status == 204
    for user, path in ((bob, f"{API}/{chat_id}/stream"), (alice, f"{API}/{uuid.uuid4()}/stream")):
        status, error = await call(api, user, "GET", path)
        assert status == 404 and error["message"] == "chat not found"


async def test_regenerate_answers_the_last_user_message_again(
    api: ApiInstance, alice: ApiUser, post: Any
) -> None:
    chat_id = await new_chat_id(api, alice, "what now")
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    await _end_turn(worker, "echo: what now")
    before = (await _messages(api, alice, chat_id))["messages"]

    # The client dropped the answer it regenerates; what it sends is not what chatd reads.
    stream = await post(
        alice, body(chat_id, "the client's copy", trigger="regenerate-message", messageId="b")
    )
    start = await stream.until("start")
    after = (await _messages(api, alice, chat_id))["messages"]
    assert [m["role"] for m in after] == ["user"]
    assert after[0]["id"] > before[-1]["id"]
    assert after[0]["content"] == [{"type": "text", "text": "what now"}]
    assert start["messageId"] == f"answer-{after[0]['id']}"
    _, chat = await call(api, alice, "GET", f"/api/v1/chats/{chat_id}")
    assert chat["status"] == "pending"

    status, error = await _refused(api, alice, body(uuid.uuid4(), trigger="regenerate-message"))
    assert status == 404, error


async def test_a_message_sent_while_busy_is_queued_and_its_own_turn_is_streamed(
    api: ApiInstance, alice: ApiUser, post: Any
) -> None:
    chat_id = uuid.uuid4()
    first = await post(alice, body(chat_id, "first"))
    await first.until("start")
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    await worker.parts("echo:", " fir")

    second = await post(alice, body(chat_id, "second"))
    page = await _wait_queued(api, alice, chat_id)
    assert page["queued"][0]["content"] == [{"type": "text", "text": "second"}]
    assert [m["role"] for m in page["messages"]] == ["user"]

    # The first turn ends; in the same transaction the queue's head becomes the next message.
    await _end_turn(worker, "echo: first")
    await first.to_end()
    assert first.text == "echo: first" and first.types[-1] == "finish"

    messages = (await _messages(api, alice, chat_id))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    start = await second.until("start")
    assert start["messageId"] == f"answer-{messages[-1]['id']}"
    await worker.parts("echo:", " second")
    await _end_turn(worker, "echo: second")
    await second.to_end()
    assert second.text == "echo: second"  # only its own turn
    assert second.types[-1] == "finish"


async def _wait_queued(api: ApiInstance, user: ApiUser, chat_id: uuid.UUID) -> dict[str, Any]:
    """The chat's page once a message is queued (the POST queues it before it streams)."""

    async def queued() -> bool:
        return bool((await _messages(api, user, chat_id))["queued"])

    seen: bool = await wait_for(queued, message="a queued message")
    assert seen
    return await _messages(api, user, chat_id)


async def test_a_queued_message_that_is_deleted_ends_its_stream_with_abort(
    api: ApiInstance, alice: ApiUser, post: Any
) -> None:
    chat_id = uuid.uuid4()
    first = await post(alice, body(chat_id, "first"))
    await first.until("start")
    await SimulatedWorker(api.pool, chat_id).acquire()
    second = await post(alice, body(chat_id, "second"))
    page = await _wait_queued(api, alice, chat_id)
    status, _ = await call(
        api, alice, "DELETE", f"/api/v1/chats/{chat_id}/queue/{page['queued'][0]['id']}"
    )
    assert status == 204
    chunks = await second.to_end()
    assert [c["type"] for c in chunks] == ["start", "abort"]


async def test_a_queued_message_left_by_a_stop_ends_its_stream_with_abort(
    api: ApiInstance, alice: ApiUser, post: Any
) -> None:
    chat_id = uuid.uuid4()
    first = await post(alice, body(chat_id, "first"))
    await first.until("start")
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    second = await post(alice, body(chat_id, "second"))
    await _wait_queued(api, alice, chat_id)
    await call(api, alice, "POST", f"/api/v1/chats/{chat_id}/interrupt")
    await _end_turn(worker, "echo: fi", interrupted=True)  # a Stop leaves the queue as it was
    assert (await first.to_end())[-1]["type"] == "abort"
    chunks = await second.to_end()
    assert [c["type"] for c in chunks] == ["start", "abort"]
    assert "still queued" in chunks[-1]["reason"]


# --------------------------------------------------------------------------------------------
# What is refused.


async def test_another_users_chat_id_answers_404_and_changes_nothing(
    api: ApiInstance, alice: ApiUser
) -> None:
    bob = await factories.create_api_user(api.pool, name="bob")
    chat_id = await new_chat_id(api, alice, "mine")
    for trigger in ("submit-message", "regenerate-message"):
        status, error = await _refused(api, bob, body(chat_id, "theirs", trigger=trigger))
        assert status == 404 and error["message"] == "chat not found"
    messages = (await _messages(api, alice, chat_id))["messages"]
    assert [m["content"] for m in messages] == [[{"type": "text", "text": "mine"}]]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda b: b | {"id": "not-a-uuid"}, "id"),
        (lambda b: {k: v for k, v in b.items() if k != "trigger"}, "trigger"),
        (lambda b: b | {"trigger": "resume-stream"}, "trigger"),
        (lambda b: b | {"messages": []}, "messages"),
        (lambda b: b | {"messages": "hello"}, "messages"),
        (lambda b: b | {"messages": [{"role": "robot", "parts": []}]}, "messages.0.role"),
        (lambda b: b | {"messages": [{"role": "user", "parts": [{"text": "x"}]}]}, "type"),
        (lambda b: b | {"messages": [{"role": "assistant", "parts": []}]}, "messages"),
        (
            lambda b: b | {"messages": [{"role": "user", "parts": [{"type": "text", "text": 5}]}]},
            "messages.0.parts.0.text",
        ),
        (
            lambda b: (
                b | {"messages": [{"role": "user", "parts": [{"type": "text", "text": " "}]}]}
            ),
            "messages.0.parts",
        ),
        (
            lambda b: b | {"messages": [{"role": "user", "parts": [{"type": "step-start"}]}]},
            "messages.0.parts",
        ),
        (
            lambda b: (
                b
                | {
                    "messages": [
                        {
                            "role": "user",
                            "parts": [
                                {"type": "text", "text": "look"},
                                {"type": "file", "mediaType": "image/png", "url": "data:,"},
                            ],
                        }
                    ]
                }
            ),
            "messages.0.parts.1",
        ),
        (lambda b: b | {"model_config_id": "echo"}, "model_config_id"),
    ],
)
async def test_bad_input_is_a_400_that_writes_nothing(
    api: ApiInstance, alice: ApiUser, change: Any, field: str
) -> None:
    chat_id = uuid.uuid4()
    status, error = await _refused(api, alice, change(body(chat_id)))
    assert status == 400, error
    fields = [v["field"] for v in error.get("validations", [])]
    assert any(field in name for name in fields), (field, error)
    status, _ = await call(api, alice, "GET", f"/api/v1/chats/{chat_id}")
    assert status == 404


async def test_cookie_posts_need_the_csrf_token(api: ApiInstance, alice: ApiUser) -> None:
    async with api.client.post("/api/v1/sessions", json={"token": alice.token}) as response:
        assert response.status == 201
        session = await response.json()
        cookie = response.cookies["chatd_session"].value
    chat_id = uuid.uuid4()
    headers = {"Cookie": f"chatd_session={cookie}"}
    async with api.client.post(API, json=body(chat_id), headers=headers) as response:
        assert response.status == 403
    headers["X-CSRF-Token"] = session["csrf_token"]
    async with api.client.post(API, json=body(chat_id), headers=headers) as response:
        assert response.status == 200
        assert (await UIStream(response).until("start"))["type"] == "start"


# --------------------------------------------------------------------------------------------
# When this replica cannot keep up or go on.


async def test_a_stream_that_fell_behind_is_joined_again_from_its_cursor(
    database_url: str,
) -> None:
    async with api_instance(database_url, max_queued_events_per_client=3) as api:
        alice = await factories.create_api_user(api.pool, name="alice")
        chat_id = uuid.uuid4()
        async with api.client.post(API, json=body(chat_id), headers=alice.headers) as response:
            stream = UIStream(response)
            await stream.until("start")
            worker = SimulatedWorker(api.pool, chat_id)
            await worker.acquire()
            await worker.parts("echo:")
            await stream.until_text("echo:")
            # One flush of more parts than a client may hold: its hub queue overflows.
            words = [f" w{i}" for i in range(10)]
            await worker.parts(*words)
            await stream.until_text("echo:" + "".join(words))
            await _end_turn(worker, "echo:" + "".join(words))
            await stream.to_end()
        assert api.hubs.stats().overflows == 1
        assert stream.types[-1] == "finish"
        assert stream.types.count("text-start") == 1  # one part, continued after the rejoin


async def test_a_replica_that_stops_drops_the_connection_so_that_the_client_resumes(
    api: ApiInstance, alice: ApiUser, post: Any
) -> None:
    chat_id = uuid.uuid4()
    stream = await post(alice, body(chat_id))
    await stream.until("start")
    api.hubs.close_all()  # what a replica does when it shuts down
    with pytest.raises(aiohttp.ClientPayloadError):
        await stream.next()  # cut, not ended: no [DONE]
    assert not stream.finished


async def test_the_streams_count_against_streams_per_user(database_url: str) -> None:
    async with api_instance(database_url, max_streams_per_user=1) as api:
        alice = await factories.create_api_user(api.pool, name="alice")
        chat_id = uuid.uuid4()
        async with api.client.post(API, json=body(chat_id), headers=alice.headers) as response:
            await UIStream(response).until("start")
            status, error = await call(api, alice, "GET", f"{API}/{chat_id}/stream")
            assert status == 429 and error["limit"] == "streams_per_user"
            status, error = await _refused(api, alice, body(chat_id, "another"))
            assert status == 429 and error["limit"] == "streams_per_user"
        messages = (await _messages(api, alice, chat_id))["messages"]
        assert len(messages) == 1  # refused before anything was sent
