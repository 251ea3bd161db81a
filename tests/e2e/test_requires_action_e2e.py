"""requires_action across real `chatd serve` processes: the replica that ran the step that called
a client tool is SIGKILLed while the chat waits for its client; the client posts the results to
another replica, which continues the turn. Everything the wait needs is in the tables, so the
turn completes once, with the results (docs/requires_action.md)."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from app.http.auth import create_token
from tests import engine_harness
from tests.conditions import wait_for
from tests.e2e.replicas import ReplicaProcess

pytestmark = pytest.mark.e2e

LOCATE = {
    "name": "get_location",
    "description": "Where the user is.",
    "input_schema": {"type": "object", "properties": {"precise": {"type": "boolean"}}},
}


@pytest.fixture
async def start_replica(tmp_path: Path, database_url: str) -> AsyncIterator[Any]:
    started: list[ReplicaProcess] = []

    async def start(name: str) -> ReplicaProcess:
        replica = ReplicaProcess(
            log_dir=tmp_path,
            name=name,
            env={"DATABASE_URL": database_url, "CHATD_LOG_LEVEL": "INFO"} | engine_harness.FAST_ENV,
        )
        replica.start()
        started.append(replica)
        await replica.wait_healthy(timeout_s=60)
        return replica

    try:
        yield start
    finally:
        for replica in started:
            replica.kill()


async def _post(session: aiohttp.ClientSession, url: str, token: str, body: Any) -> tuple[int, Any]:
    async with session.post(
        url, json=body, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return response.status, await response.json()


async def test_results_posted_to_another_replica_after_a_sigkill_complete_the_turn_once(
    start_replica: Any, pool: asyncpg.Pool
) -> None:
    first: ReplicaProcess = await start_replica("first")
    token = await create_token(pool, "client")
    async with aiohttp.ClientSession() as session:
        status, chat = await _post(
            session,
            f"{first.url}/api/v1/chats",
            token,
            {"content": '/tool get_location {"precise": true}', "tools": [LOCATE]},
        )
        assert status == 201, chat
        chat_id = uuid.UUID(chat["id"])
        waiting = await engine_harness.wait_status(pool, chat_id, "requires_action", timeout_s=30)
        assert waiting.pending_tool_calls is not None
        (call,) = waiting.pending_tool_calls
        # The first replica ran the step; its run ended (the slot is free) and it holds nothing.
        await wait_for(
            lambda: f"chat_id={chat_id}" in first.logs() and "run.requires_action" in first.logs(),
            message="the first replica's log of the step",
        )

        second: ReplicaProcess = await start_replica("second")
        first.signal(signal.SIGKILL)
        assert await first.wait_exit() == -signal.SIGKILL

        status, answer = await _post(
            session,
            f"{second.url}/api/v1/chats/{chat_id}/tool-results",
            token,
            {"results": [{"tool_call_id": call["id"], "result": {"city": "Lyon"}}]},
        )
        assert status == 200, answer
        assert answer["chat"]["status"] == "pending"
        final = await engine_harness.wait_status(pool, chat_id, "waiting", timeout_s=30)

    history = await engine_harness.history(pool, chat_id)
    assert [role for role, _ in history] == ["user", "assistant", "tool", "assistant"]
    assert history[1][1] == [
        {"type": "tool_call", "id": call["id"], "name": "get_location", "args": {"precise": True}}
    ]
    assert [(r["tool_call_id"], r["result"]) for r in history[2][1]] == [
        (call["id"], {"city": "Lyon"})
    ]
    answer_text = engine_harness.text_of(history[3][1])
    assert answer_text == f"echo: get_location returned {json.dumps({'city': 'Lyon'})}"
    # The step ran once (generation 1, on the first replica), the rest of the turn once
    # (generation 2, on the second).
    assert (final.generation, final.pending_tool_calls) == (2, None)
    assert f"chat_id={chat_id}" in second.logs()
    assert (
        await pool.fetchval("SELECT count(*) FROM chat_messages WHERE chat_id = $1", chat_id) == 4
    )
