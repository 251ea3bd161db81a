"""In-process API instances over real HTTP for integration tests: each instance has its own pool,
its own listener (its own LISTEN connection) and its own aiohttp server, like a replica without
the worker. Also: users with tokens, an SSE reader, and a simulated worker that writes parts,
messages and statuses with SQL the way the engine does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app.config import Settings
from app.db.listener import Listener
from app.http.keys import STREAM_HUBS
from app.http.server import build_app
from app.stream.hub import StreamHubs
from app.terminal import SseEvent, SseParser, iter_sse
from tests import factories
from tests.factories import ApiUser


@dataclass
class ApiInstance:
    settings: Settings
    pool: asyncpg.Pool
    listener: Listener
    app: web.Application
    client: TestClient[web.Request, web.Application]

    @property
    def hubs(self) -> StreamHubs:
        return self.app[STREAM_HUBS]

    def url(self, path: str) -> str:
        return str(self.client.make_url(path))


@contextlib.asynccontextmanager
async def api_instance(
    database_url: str,
    *,
    pool_size: int = 10,
    server_tool_names: Collection[str] = (),
    **overrides: Any,
) -> AsyncIterator[ApiInstance]:
    """`server_tool_names`: the server-side tools the API refuses as client tool names (an
    instance has no worker, so none by default)."""
    settings = Settings(database_url=database_url, keepalive_interval_s=5.0)
    for name, value in overrides.items():
        setattr(settings, name, value)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=pool_size)
    assert pool is not None
    listener = Listener(database_url, keepalive_interval_s=1.0)
    listener_task = asyncio.create_task(listener.run(), name="test-listener")
    try:
        async with asyncio.timeout(10):
            await listener.wait_connected()
        names = frozenset(server_tool_names)
        app = build_app(
            settings=settings, pool=pool, listener=listener, server_tool_names=lambda: names
        )
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            yield ApiInstance(settings, pool, listener, app, client)
        finally:
            await client.close()
    finally:
        listener_task.cancel()
        await asyncio.wait([listener_task])
        await pool.close()


# --------------------------------------------------------------------------------------------
# Streams.


@dataclass
class StreamReader:
    """Reads an SSE response into a list of events; `text()` assembles the answer the way a
    client does (parts of the step in progress, voided by retry/history_reset, replaced by the
    persisted message)."""

    response: aiohttp.ClientResponse
    events: list[SseEvent] = field(default_factory=list)
    parser: SseParser = field(default_factory=SseParser)
    _iterator: AsyncIterator[SseEvent] | None = None

    async def next(self, timeout_s: float = 10.0) -> SseEvent:
        if self._iterator is None:
            self._iterator = iter_sse(self.response, self.parser)
        async with asyncio.timeout(timeout_s):
            event = await anext(self._iterator)
        self.events.append(event)
        return event

    async def until(self, predicate: Any, timeout_s: float = 10.0) -> SseEvent:
        while True:
            event = await self.next(timeout_s)
            if predicate(event):
                return event

    async def until_end(self, timeout_s: float = 10.0) -> None:
        with contextlib.suppress(StopAsyncIteration):
            while True:
                await self.next(timeout_s)

    @property
    def last_id(self) -> str | None:
        for event in reversed(self.events):
            if event.id:
                return event.id
        return None


def assemble(events: list[SseEvent]) -> dict[str, Any]:
    """A client's view after `events`: messages by id, and the text of the step in progress."""
    messages: dict[int, dict[str, Any]] = {}
    live: list[str] = []
    for event in events:
        data = event.json()
        kind = data["type"]
        if kind == "message":
            message = data["message"]
            assert message["id"] not in messages, f"message {message['id']} delivered twice"
            messages[message["id"]] = message
            live = []
        elif kind == "message_part":
            live.append(data["part"].get("text", ""))
        elif kind == "retry":
            live = []
        elif kind == "history_reset":
            live = []
            for message_id in [m for m in messages if m >= data["from_message_id"]]:
                del messages[message_id]
    return {"messages": messages, "live_text": "".join(live)}


def message_text(message: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in message["content"])


# --------------------------------------------------------------------------------------------
# A worker simulated in SQL, writing what the engine writes.


class SimulatedWorker:
    def __init__(self, pool: asyncpg.Pool, chat_id: uuid.UUID) -> None:
        self.pool = pool
        self.chat_id = chat_id
        self.worker_id = uuid.uuid4()
        self.generation = 0

    async def acquire(self) -> int:
        generation = await self.pool.fetchval(
            """
            UPDATE chats SET status = 'running', worker_id = $2, generation = generation + 1,
                             started_at = now(), heartbeat_at = now()
            WHERE id = $1 RETURNING generation
            """,
            self.chat_id,
            self.worker_id,
        )
        assert generation is not None
        self.generation = generation
        return int(generation)

    async def parts(self, *texts: str, role: str = "assistant") -> list[int]:
        """One flush window: one multi-row insert (one notification), written here rather than
        with the factories because the one statement is what it simulates."""
        rows = await self.pool.fetch(
            """
            INSERT INTO chat_stream_parts (chat_id, generation, message_role, part)
            SELECT $1, $2, $3, p::jsonb FROM unnest($4::text[]) WITH ORDINALITY AS t(p, n)
            ORDER BY n
            RETURNING id
            """,
            self.chat_id,
            self.generation,
            role,
            [json.dumps({"type": "text", "text": text}) for text in texts],
        )
        return [row["id"] for row in rows]

    async def retry(self, attempt: int = 1) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM chats WHERE id = $1 FOR UPDATE", self.chat_id)
            await conn.execute("DELETE FROM chat_stream_parts WHERE chat_id = $1", self.chat_id)
            retry = {
                "type": "retry",
                "attempt": attempt,
                "delay_ms": 1000,
                "retrying_at": "2030-01-01T00:00:00+00:00",
                "kind": "overloaded",
                "provider": "anthropic",
                "status_code": 529,
                "error": "overloaded",
            }
            row = await factories.create_stream_part(
                conn,
                chat_id=self.chat_id,
                generation=self.generation,
                part=retry,
                message_role="system",
            )
            part_id: int = row["id"]
            return part_id

    async def persist(self, text: str) -> int:
        """The step's message; the same transaction deletes the step's parts."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM chats WHERE id = $1 FOR UPDATE", self.chat_id)
            await conn.execute("DELETE FROM chat_stream_parts WHERE chat_id = $1", self.chat_id)
            row = await factories.create_message(
                conn, chat_id=self.chat_id, role="assistant", text=text, output_tokens=7
            )
            message_id: int = row["id"]
            return message_id

    async def finish(
        self, status: str = "waiting", last_error: dict[str, Any] | None = None
    ) -> None:
        await self.pool.execute(
            """
            UPDATE chats SET status = $2, worker_id = NULL, last_error = $3::jsonb
            WHERE id = $1
            """,
            self.chat_id,
            status,
            json.dumps(last_error) if last_error is not None else None,
        )

    async def require_action(self, calls: list[dict[str, Any]]) -> None:
        """The step that called client tools, and the hand-over to the client, as the engine
        writes them (runs_persist_step + runs_require_action, one transaction)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM chats WHERE id = $1 FOR UPDATE", self.chat_id)
            await conn.execute("DELETE FROM chat_stream_parts WHERE chat_id = $1", self.chat_id)
            await factories.create_message(
                conn,
                chat_id=self.chat_id,
                role="assistant",
                content=[{"type": "tool_call", **call} for call in calls],
            )
            await conn.execute(
                """
                UPDATE chats SET status = 'requires_action', worker_id = NULL,
                                 pending_tool_calls = $2::jsonb,
                                 action_deadline_at = now() + interval '1 hour'
                WHERE id = $1
                """,
                self.chat_id,
                json.dumps(calls),
            )

    async def heartbeat(self) -> None:
        await self.pool.execute("UPDATE chats SET heartbeat_at = now() WHERE id = $1", self.chat_id)


async def call(
    api: ApiInstance, user: ApiUser, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    """One JSON request as `user`: its status and decoded body (None for 204)."""
    async with api.client.request(method, path, json=body, headers=user.headers) as response:
        payload = await response.json() if response.status != 204 else None
        return response.status, payload


async def new_chat(api: ApiInstance, user: ApiUser, text: str = "hello") -> dict[str, Any]:
    """POST /api/v1/chats as `user`; the created chat."""
    status, chat = await call(api, user, "POST", "/api/v1/chats", {"content": text})
    assert status == 201, chat
    return dict(chat)


async def new_chat_id(api: ApiInstance, user: ApiUser, text: str = "hello") -> uuid.UUID:
    return uuid.UUID((await new_chat(api, user, text))["id"])


@contextlib.asynccontextmanager
async def open_sse(
    api: ApiInstance,
    user: ApiUser,
    chat_id: uuid.UUID,
    *,
    last_event_id: str | None = None,
    after: str | None = None,
) -> AsyncIterator[StreamReader]:
    """GET the chat's SSE stream (from a cursor) as `user`; its events as they come."""
    headers = dict(user.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    path = f"/api/v1/chats/{chat_id}/stream" + (f"?after={after}" if after else "")
    async with api.client.get(path, headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        yield StreamReader(response)
