"""Helpers of the engine tests: fast settings, in-process replicas, users, slow echo models, and
reads of what a user would see (status, history)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, TypeVar

import asyncpg

from app.aio import Batcher
from app.config import Settings
from app.db.listener import Listener
from app.engine.replica import Replica
from app.state.model import Chat
from tests.conditions import wait_for
from tests.notifications import NotificationRecorder, Received

FAST_SETTINGS = Settings(
    max_concurrent_runs=50,
    acquire_poll_interval_s=1.0,
    heartbeat_interval_s=0.2,
    stale_threshold_s=5.0,
    liveness_check_interval_s=0.1,
    shutdown_grace_s=5.0,
    part_flush_interval_ms=10.0,
    max_steps_per_turn=5,
)

# The same settings as environment variables, for real `chatd serve` processes.
FAST_ENV = {
    "CHATD_ACQUIRE_POLL_INTERVAL_S": "1.0",
    "CHATD_HEARTBEAT_INTERVAL_S": "0.2",
    "CHATD_STALE_THRESHOLD_S": "5.0",
    "CHATD_LIVENESS_CHECK_INTERVAL_S": "0.1",
    "CHATD_SHUTDOWN_GRACE_S": "5.0",
    "CHATD_PART_FLUSH_INTERVAL_MS": "10",
}


T = TypeVar("T")


async def eventually(
    condition: Callable[[], Awaitable[T | None]],
    *,
    timeout_s: float = 15.0,
    interval_s: float = 0.02,
    message: str = "condition",
) -> T:
    """`tests.conditions.wait_for` with the engine tests' longer default deadline."""
    result: T | None = await wait_for(
        condition, timeout_s=timeout_s, interval_s=interval_s, message=message
    )
    assert result is not None
    return result


def settings(**overrides: Any) -> Settings:
    return replace(FAST_SETTINGS, **overrides)


@asynccontextmanager
async def running_listener(dsn: str) -> AsyncIterator[Listener]:
    listener = Listener(dsn, keepalive_interval_s=1.0)
    task = asyncio.create_task(listener.run(), name="test-listener")
    try:
        async with asyncio.timeout(10):
            await listener.wait_connected()
        yield listener
    finally:
        task.cancel()
        await asyncio.wait({task})


B = TypeVar("B", bound=Batcher[Any, Any])


@asynccontextmanager
async def batching(batcher: B) -> AsyncIterator[B]:
    """Run `batcher`'s batch task for the block, as its replica does."""
    task = asyncio.create_task(batcher.run())
    await wait_for(lambda: batcher.running, message="batch task running")
    try:
        yield batcher
    finally:
        task.cancel()
        await asyncio.wait({task})


@asynccontextmanager
async def running_replica(dsn: str, pool: asyncpg.Pool, **overrides: Any) -> AsyncIterator[Replica]:
    """A started replica with its own listener (as a process would have), stopped at exit."""
    stream_step = overrides.pop("stream_step", None)
    tools = overrides.pop("tools", None)
    async with running_listener(dsn) as listener:
        extra: dict[str, Any] = {}
        if stream_step is not None:
            extra["stream_step"] = stream_step
        replica = Replica(
            settings=settings(**overrides),
            pool=pool,
            listener=listener,
            dsn=dsn,
            tools=tools,
            **extra,
        )
        await replica.start()
        try:
            yield replica
        finally:
            await replica.stop()
            exc = replica.main_task.exception() if not replica.main_task.cancelled() else None
            assert exc is None, f"the replica crashed: {exc!r}"


async def state_snapshot(pool: asyncpg.Pool) -> tuple[object, ...]:
    """Everything a chat transition could change (the chat rows, the messages, the queue), for
    before/after comparisons: "refused, and nothing changed"."""
    chat_rows = await pool.fetch(
        "SELECT id, status, version, worker_id, generation, title, archived,"
        " interrupt_requested_at, pending_tool_calls, action_deadline_at, client_tools"
        " FROM chats ORDER BY id"
    )
    messages = await pool.fetch(
        "SELECT id, chat_id, role, content, deleted FROM chat_messages ORDER BY id"
    )
    queued = await pool.fetch("SELECT id, chat_id, content, promoted FROM chat_queued_messages")
    return (
        [tuple(r.values()) for r in chat_rows],
        [tuple(r.values()) for r in messages],
        [tuple(r.values()) for r in queued],
    )


async def chat_row(pool: asyncpg.Pool, chat_id: uuid.UUID) -> Chat:
    row = await pool.fetchrow("SELECT * FROM chats WHERE id = $1", chat_id)
    assert row is not None
    return Chat.from_record(row)


async def wait_status(
    pool: asyncpg.Pool, chat_id: uuid.UUID, *statuses: str, timeout_s: float = 15.0
) -> Chat:
    async def reached() -> Chat | None:
        chat = await chat_row(pool, chat_id)
        return chat if chat.status in statuses else None

    return await eventually(reached, timeout_s=timeout_s, message=f"chat {chat_id} in {statuses}")


async def history(pool: asyncpg.Pool, chat_id: uuid.UUID) -> list[tuple[str, list[Any]]]:
    """The visible history as (role, content) pairs, in id order."""
    rows = await pool.fetch(
        "SELECT role, content FROM chat_messages WHERE chat_id = $1 AND NOT deleted ORDER BY id",
        chat_id,
    )
    return [(row["role"], json.loads(row["content"])) for row in rows]


def text_of(content: list[Any]) -> str:
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


async def parts_of(pool: asyncpg.Pool, chat_id: uuid.UUID) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM chat_stream_parts WHERE chat_id = $1 ORDER BY id", chat_id
    )


async def wait_parts(pool: asyncpg.Pool, chat_id: uuid.UUID, *, at_least: int = 1) -> None:
    async def enough() -> bool:
        return len(await parts_of(pool, chat_id)) >= at_least

    await eventually(enough, message=f"{at_least} live parts of chat {chat_id}")


def assert_chat_notifications_consistent(received: list[Received], final: Chat) -> None:
    """Every `chat` notification of one chat has a strictly greater version than the one before
    it (no status ever goes backwards), and the last one is the row as it is now."""
    chat_events = [r.json() for r in received if r.json().get("type") == "chat"]
    assert chat_events, "no chat notification was recorded"
    versions = [event["version"] for event in chat_events]
    assert versions == sorted(set(versions)), f"versions not strictly increasing: {versions}"
    last = chat_events[-1]
    assert last["version"] == final.version
    assert last["status"] == final.status
    assert last["generation"] == final.generation
    assert last["worker_id"] == (str(final.worker_id) if final.worker_id else None)


def assert_owner_notifications_consistent(received: list[Received], final: Chat) -> None:
    """The same for a chat's notifications on its owner's channel (chat_owner:<user id>), which
    carry every status change: versions strictly increase, the last one is the row now."""
    events = [r.json() for r in received if r.json().get("chat_id") == str(final.id)]
    assert events, f"no owner notification of chat {final.id}"
    versions = [event["version"] for event in events]
    assert versions == sorted(set(versions)), f"versions not strictly increasing: {versions}"
    assert (events[-1]["version"], events[-1]["status"]) == (final.version, final.status)


async def record_chats(
    dsn: str, chat_ids: list[uuid.UUID]
) -> tuple[asyncpg.Connection, NotificationRecorder]:
    """A raw LISTEN connection on the chats' channels (close the connection when done)."""
    conn = await asyncpg.connect(dsn)
    recorder = NotificationRecorder(conn)
    await recorder.listen(*(f"chat:{chat_id}" for chat_id in chat_ids))
    return conn, recorder
