"""The terminal client (app/terminal.py) against an in-process API with a worker simulated in SQL:
what it prints for parts, retries, errors and queued messages, and where it finds its defaults."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from app import terminal
from app.http.auth import ensure_local_token
from app.terminal import ApiClient, Conversation, Renderer
from tests import factories
from tests.conditions import wait_for
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, SimulatedWorker, api_instance


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url) as instance:
        yield instance


class Terminal:
    def __init__(self) -> None:
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.renderer = Renderer(out=self.out, err=self.err)


async def _newest_chat(api: ApiInstance) -> uuid.UUID:
    chat_id: uuid.UUID = await wait_for(
        lambda: api.pool.fetchval("SELECT id FROM chats ORDER BY created_at DESC LIMIT 1"),
        message="the chat",
    )
    return chat_id


class Lines:
    """What the user types, line by line (None: the input ended)."""

    echoed = False

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def readline(self) -> str | None:
        return await self.queue.get()


async def _converse(
    api: ApiInstance,
    user: ApiUser,
    terminal: Terminal,
    text: str,
    chat_id: str | None = None,
    *,
    answers: Lines | None = None,
) -> asyncio.Task[int]:
    session = aiohttp.ClientSession()
    conversation = Conversation(
        ApiClient(session, api.url("/"), user.token), terminal.renderer, answers=answers
    )

    async def run() -> int:
        try:
            return await conversation.run(text, chat_id=chat_id)
        finally:
            await session.close()

    return asyncio.create_task(run())


async def test_streams_parts_shows_retries_and_ends_with_the_turn(api: ApiInstance) -> None:
    user = await factories.create_api_user(api.pool)
    terminal = Terminal()
    task = await _converse(api, user, terminal, "question")
    worker = SimulatedWorker(api.pool, await _newest_chat(api))
    await worker.acquire()
    await worker.parts("doomed ")
    await wait_for(lambda: "doomed" in terminal.out.getvalue(), message="the first part shown")
    await worker.retry(attempt=1)
    await wait_for(lambda: "[retry 1" in terminal.err.getvalue(), message="the retry shown")
    await worker.parts("second ", "try")
    await wait_for(lambda: "second try" in terminal.out.getvalue(), message="the new parts")
    await worker.persist("second try")
    await worker.finish()
    assert await asyncio.wait_for(task, 10) == 0
    assert terminal.out.getvalue() == "doomed \nsecond try\n"
    assert "[retry 1 in 1.0s: overloaded from anthropic: overloaded]" in terminal.err.getvalue()


async def test_a_failed_turn_prints_the_error_and_exits_1(api: ApiInstance) -> None:
    user = await factories.create_api_user(api.pool)
    terminal = Terminal()
    task = await _converse(api, user, terminal, "question")
    worker = SimulatedWorker(api.pool, await _newest_chat(api))
    await worker.acquire()
    await worker.finish(
        "error",
        last_error={"kind": "auth", "provider": "openai", "message": "bad key", "status_code": 401},
    )
    assert await asyncio.wait_for(task, 10) == 1
    assert "error: bad key (auth, openai 401)" in terminal.err.getvalue()


async def test_an_answer_already_persisted_is_printed_whole(api: ApiInstance) -> None:
    user = await factories.create_api_user(api.pool)
    async with api.client.post(
        "/api/v1/chats", json={"content": "first"}, headers=user.headers
    ) as response:
        chat_id = uuid.UUID((await response.json())["id"])
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    await worker.persist("first answer")
    await worker.finish()

    terminal = Terminal()
    task = await _converse(api, user, terminal, "second", chat_id=str(chat_id))
    await wait_for(
        lambda: api.pool.fetchval("SELECT status = 'pending' FROM chats WHERE id = $1", chat_id),
        message="pending",
    )
    await worker.acquire()
    await worker.persist("second answer")  # no live parts were seen: printed from the message
    await worker.finish()
    assert await asyncio.wait_for(task, 10) == 0
    assert terminal.out.getvalue() == "second answer\n"


async def test_a_queued_message_waits_for_its_own_turn(api: ApiInstance) -> None:
    user = await factories.create_api_user(api.pool)
    async with api.client.post(
        "/api/v1/chats", json={"content": "first"}, headers=user.headers
    ) as response:
        chat_id = uuid.UUID((await response.json())["id"])
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()

    terminal = Terminal()
    task = await _converse(api, user, terminal, "queued one", chat_id=str(chat_id))
    await wait_for(lambda: "[queued as #" in terminal.err.getvalue(), message="queued")
    await worker.persist("first answer")
    # Turn done: the worker pops the queue head and stays busy (one transaction in the engine).
    async with api.pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM chat_queued_messages WHERE chat_id = $1", chat_id)
        await factories.create_message(conn, chat_id=chat_id, text="queued one")
    await worker.parts("echo queued")
    await wait_for(lambda: "echo queued" in terminal.out.getvalue(), message="its answer")
    assert not task.done()
    await worker.persist("echo queued")
    await worker.finish()
    assert await asyncio.wait_for(task, 10) == 0
    assert terminal.out.getvalue().endswith("echo queued\n")


async def test_a_client_tool_call_is_answered_with_what_the_user_types(api: ApiInstance) -> None:
    user = await factories.create_api_user(api.pool)
    terminal = Terminal()
    lines = Lines()
    task = await _converse(api, user, terminal, "where am I?", answers=lines)
    chat_id = await _newest_chat(api)
    # The chat the terminal created declares the built-in question tool.
    tools = await api.pool.fetchval("SELECT client_tools FROM chats WHERE id = $1", chat_id)
    assert [tool["name"] for tool in json.loads(tools)] == ["ask_user_question"]
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    calls = [
        {"id": "call_1", "name": "get_location", "args": {"precise": True}},
        {"id": "call_2", "name": "get_location", "args": {}},
    ]
    await worker.require_action(calls)
    await wait_for(lambda: "needs a result" in terminal.out.getvalue(), message="the prompt")
    assert 'get_location({"precise": true})' in terminal.out.getvalue()
    lines.queue.put_nowait('{"city": "Lyon"}')
    lines.queue.put_nowait("!permission denied")
    await wait_for(
        lambda: api.pool.fetchval("SELECT status = 'pending' FROM chats WHERE id = $1", chat_id),
        message="the answer taken",
    )
    results = json.loads(
        await api.pool.fetchval(
            "SELECT content FROM chat_messages WHERE chat_id = $1 AND role = 'tool'", chat_id
        )
    )
    assert [(r["tool_call_id"], r["result"], r["is_error"]) for r in results] == [
        ("call_1", {"city": "Lyon"}, False),
        ("call_2", "permission denied", True),
    ]
    await worker.acquire()
    await worker.persist("you are in Lyon")
    await worker.finish()
    assert await asyncio.wait_for(task, 10) == 0
    out = terminal.out.getvalue()
    assert '↳ get_location: {"city": "Lyon"}' in out
    assert '↳ get_location (error): "permission denied"' in out
    assert out.endswith("you are in Lyon\n")


async def test_a_stop_while_the_user_is_asked_ends_the_turn(api: ApiInstance) -> None:
    user = await factories.create_api_user(api.pool)
    terminal = Terminal()
    lines = Lines()
    task = await _converse(api, user, terminal, "a question for me", answers=lines)
    chat_id = await _newest_chat(api)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    question = {"question": "Sure?", "choices": ["yes", "no"]}
    await worker.require_action([{"id": "call_q", "name": "ask_user_question", "args": question}])
    await wait_for(lambda: "2. no" in terminal.out.getvalue(), message="the question")
    async with api.client.post(
        f"/api/v1/chats/{chat_id}/interrupt", headers=user.headers
    ) as response:
        assert response.status == 200
    assert await asyncio.wait_for(task, 10) == 0  # the turn ended: no answer is waited for
    assert lines.queue.empty()
    (result,) = json.loads(
        await api.pool.fetchval(
            "SELECT content FROM chat_messages WHERE chat_id = $1 AND role = 'tool'", chat_id
        )
    )
    assert (result["result"], result["is_error"]) == ("interrupted", True)
    assert '↳ ask_user_question (error): "interrupted"' in terminal.out.getvalue()


def test_defaults_come_from_the_environment_then_the_local_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CHATD_URL", raising=False)
    monkeypatch.delenv("CHATD_TOKEN", raising=False)
    monkeypatch.setenv("CHATD_PORT", "9123")
    monkeypatch.setenv("CHATD_DATA_DIR", str(tmp_path))
    assert terminal._default_url() == "http://127.0.0.1:9123"
    assert terminal._default_token() is None
    (tmp_path / "local-token").write_text("chatd_from_file\n")
    assert terminal._default_token() == "chatd_from_file"
    monkeypatch.setenv("CHATD_TOKEN", "chatd_from_env")
    monkeypatch.setenv("CHATD_URL", "http://example:1")
    assert (terminal._default_url(), terminal._default_token()) == (
        "http://example:1",
        "chatd_from_env",
    )


async def test_the_local_token_file_is_what_chat_reads(
    api: ApiInstance, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = await ensure_local_token(api.pool, tmp_path)
    monkeypatch.delenv("CHATD_TOKEN", raising=False)
    monkeypatch.setenv("CHATD_DATA_DIR", str(tmp_path))
    assert terminal._default_token() == token
