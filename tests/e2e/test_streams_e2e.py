"""Streams across real `chatd serve` replicas (the engine runs the chat with a slow echo model):
a client that resumes on another replica with its last event id assembles exactly the persisted
answer, and a client that joins mid-answer on the replica that does not run the chat gets the
step from its start, then the live parts, then the message."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from app.http.auth import create_token
from app.terminal import SseEvent, iter_sse
from tests import factories
from tests.conditions import wait_for
from tests.e2e.replicas import ReplicaProcess, replica_pair
from tests.http_harness import assemble, message_text

pytestmark = pytest.mark.e2e

LONG_TEXT = " ".join(f"word{i}" for i in range(80))
ENV = {"CHATD_PART_FLUSH_INTERVAL_MS": "10", "CHATD_KEEPALIVE_INTERVAL_S": "1"}


@pytest.fixture
async def replicas(
    tmp_path: Path, database_url: str
) -> AsyncIterator[tuple[ReplicaProcess, ReplicaProcess]]:
    async with replica_pair(tmp_path, {"DATABASE_URL": database_url} | ENV) as pair:
        yield pair


async def _setup(pool: asyncpg.Pool) -> tuple[dict[str, str], uuid.UUID]:
    token = await create_token(pool, f"e2e-{uuid.uuid4().hex[:6]}")
    slow = await factories.create_model_config(pool, token_delay_ms=30)
    return {"Authorization": f"Bearer {token}"}, slow


async def _create_chat(
    session: aiohttp.ClientSession,
    replica: ReplicaProcess,
    headers: dict[str, str],
    model: uuid.UUID,
) -> str:
    async with session.post(
        replica.url + "/api/v1/chats",
        json={"content": LONG_TEXT, "model_config_id": str(model)},
        headers=headers,
    ) as response:
        assert response.status == 201, await response.text()
        return str((await response.json())["id"])


async def _read(
    response: aiohttp.ClientResponse, events: list[SseEvent], until: Any, timeout_s: float = 60
) -> None:
    async with asyncio.timeout(timeout_s):
        async for event in iter_sse(response):
            events.append(event)
            if until(event):
                return
    raise AssertionError("the stream ended early")


def _done(event: SseEvent) -> bool:
    return event.event == "status" and event.json()["status"] == "waiting"


def _check_answer(events: list[SseEvent]) -> None:
    parts = [e.json() for e in events if e.event == "message_part"]
    part_ids = [p["part_id"] for p in parts]
    assert part_ids == sorted(set(part_ids)), "a live part was delivered twice or out of order"
    view = assemble(events)  # also asserts every message arrived once
    answers = [m for m in view["messages"].values() if m["role"] == "assistant"]
    assert [message_text(m) for m in answers] == ["echo: " + LONG_TEXT]
    assert "".join(p["part"].get("text", "") for p in parts) == "echo: " + LONG_TEXT


async def test_resuming_on_another_replica_assembles_exactly_the_persisted_answer(
    replicas: tuple[ReplicaProcess, ReplicaProcess], pool: asyncpg.Pool
) -> None:
    first, second = replicas
    headers, slow = await _setup(pool)
    events: list[SseEvent] = []
    async with aiohttp.ClientSession() as session:
        chat_id = await _create_chat(session, first, headers, slow)
        async with session.get(
            f"{first.url}/api/v1/chats/{chat_id}/stream", headers=headers
        ) as response:
            seen = 0

            def some_parts(event: SseEvent) -> bool:
                nonlocal seen
                seen += event.event == "message_part"
                return seen >= 5

            await _read(response, events, some_parts)
        cursor = next(e.id for e in reversed(events) if e.id)
        assert not cursor.endswith(":0")
        async with session.get(
            f"{second.url}/api/v1/chats/{chat_id}/stream",
            headers=headers | {"Last-Event-ID": cursor},
        ) as response:
            await _read(response, events, _done)
    _check_answer(events)


async def test_joining_mid_answer_on_the_replica_that_does_not_run_the_chat(
    replicas: tuple[ReplicaProcess, ReplicaProcess], pool: asyncpg.Pool
) -> None:
    headers, slow = await _setup(pool)
    async with aiohttp.ClientSession() as session:
        chat_id = await _create_chat(session, replicas[0], headers, slow)
        # Mid-answer: some parts of the step are written already.
        await wait_for(
            lambda: pool.fetchval(
                "SELECT count(*) >= 3 FROM chat_stream_parts WHERE chat_id = $1",
                uuid.UUID(chat_id),
            ),
            message="parts of the step in progress",
            timeout_s=30,
        )
        owner_pid = await pool.fetchval(
            "SELECT r.pid FROM chats c JOIN chat_replicas r ON r.id = c.worker_id WHERE c.id = $1",
            uuid.UUID(chat_id),
        )
        bystander = next(
            r for r in replicas if r.process is not None and r.process.pid != owner_pid
        )
        events: list[SseEvent] = []
        async with session.get(
            f"{bystander.url}/api/v1/chats/{chat_id}/stream", headers=headers
        ) as response:
            await _read(response, events, _done)
    _check_answer(events)
    first_part = next(e.json() for e in events if e.event == "message_part")
    assert first_part["part"]["text"].startswith("echo:")  # from the step's start
    kinds = [e.event for e in events]
    assert kinds.index("message_part") < kinds.index("queue") < len(kinds) - 3  # then live ones
