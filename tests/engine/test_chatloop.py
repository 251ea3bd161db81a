"""The chat loop of one run (app/engine/chatloop.py), driven by an in-process replica on a real
database: what a user would see in the history, the status and the live parts."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import pytest

from app.engine.chatloop import RunEnd
from app.engine.step import stream_once
from app.providers.base import (
    ClassifiedError,
    ModelRequest,
    Provider,
    ProviderError,
    StreamEvent,
    TextDelta,
)
from app.providers.retry import RetryInfo
from app.state import chats
from app.tools.registry import Tool, ToolContext, ToolRegistry
from tests import engine_harness, factories

LONG_TEXT = " ".join(f"word{i}" for i in range(60))


async def test_echo_answer_is_persisted_and_the_chat_waits(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool) as replica:
        chat, _ = await chats.create_chat(pool, owner, "hello there")
        conn, recorder = await engine_harness.record_chats(database_url, [chat.id])
        try:
            final = await engine_harness.wait_status(pool, chat.id, "waiting")
            notes = await recorder.drain_after_barrier(conn)
        finally:
            await conn.close()
    assert final.worker_id is None
    assert final.generation == 1
    assert await engine_harness.history(pool, chat.id) == [
        ("user", [{"type": "text", "text": "hello there"}]),
        ("assistant", [{"type": "text", "text": "echo: hello there"}]),
    ]
    assert await engine_harness.parts_of(pool, chat.id) == []
    assert replica.stats.run_ends == {"waiting": 1}
    # Every live part of the step was written before the message (none dropped at the end).
    assert replica.flusher.stats.parts_written >= 1
    assert replica.flusher.stats.parts_discarded == 0
    message = await pool.fetchrow(
        "SELECT * FROM chat_messages WHERE chat_id = $1 AND role = 'assistant'", chat.id
    )
    assert message is not None
    assert message["output_tokens"] > 0
    assert message["model_config_id"] == chat.model_config_id
    engine_harness.assert_chat_notifications_consistent(notes, final)


async def test_tool_calls_loop_until_the_model_answers(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool):
        chat, _ = await chats.create_chat(pool, owner, '/tool add {"a": 2, "b": 3}')
        await engine_harness.wait_status(pool, chat.id, "waiting")
    history = await engine_harness.history(pool, chat.id)
    assert [role for role, _ in history] == ["user", "assistant", "tool", "assistant"]
    (call,) = history[1][1]
    assert call["type"] == "tool_call"
    assert (call["name"], call["args"]) == ("add", {"a": 2, "b": 3})
    assert history[2][1] == [
        {
            "type": "tool_result",
            "tool_call_id": call["id"],
            "name": "add",
            "result": 5,
            "is_error": False,
        }
    ]
    assert engine_harness.text_of(history[3][1]) == "echo: add returned 5"


async def test_a_failing_tool_is_a_result_not_a_crash(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool):
        chat, _ = await chats.create_chat(pool, owner, '/tool add {"a": "two", "b": 3}')
        await engine_harness.wait_status(pool, chat.id, "waiting")
    history = await engine_harness.history(pool, chat.id)
    result = history[2][1][0]
    assert result["is_error"] is True
    assert "'a' must be a finite number" in result["result"]


async def test_the_step_limit_ends_the_turn(database_url: str, pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool, max_steps_per_turn=1):
        chat, _ = await chats.create_chat(pool, owner, "/tool current_time {}")
        final = await engine_harness.wait_status(pool, chat.id, "waiting")
    assert final.status == "waiting"
    assert [role for role, _ in await engine_harness.history(pool, chat.id)] == [
        "user",
        "assistant",
        "tool",
    ]


async def test_queued_messages_are_answered_in_order_after_the_turn(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=30)
    async with engine_harness.running_replica(database_url, pool):
        chat, _ = await chats.create_chat(pool, owner, "one two three four", model_config_id=slow)
        await engine_harness.wait_status(pool, chat.id, "running")
        for text in ("second", "third"):
            sent = await chats.send_message(pool, owner, chat.id, text, queue_limit=20)
            assert sent.queued is not None
        final = await engine_harness.wait_status(pool, chat.id, "waiting")
        assert len(await engine_harness.history(pool, chat.id)) == 6
    history = await engine_harness.history(pool, chat.id)
    assert [(role, engine_harness.text_of(content)) for role, content in history] == [
        ("user", "one two three four"),
        ("assistant", "echo: one two three four"),
        ("user", "second"),
        ("assistant", "echo: second"),
        ("user", "third"),
        ("assistant", "echo: third"),
    ]
    assert final.generation == 1  # one run answered all three turns


async def test_interrupt_during_streaming_keeps_the_partial_text(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=40)
    async with engine_harness.running_replica(database_url, pool) as replica:
        chat, _ = await chats.create_chat(pool, owner, LONG_TEXT, model_config_id=slow)
        conn, recorder = await engine_harness.record_chats(database_url, [chat.id])
        try:
            await engine_harness.wait_parts(pool, chat.id, at_least=2)
            await chats.interrupt(pool, owner, chat.id)
            final = await engine_harness.wait_status(pool, chat.id, "waiting")
            notes = await recorder.drain_after_barrier(conn)
        finally:
            await conn.close()
    assert replica.stats.run_ends == {"waiting": 1}  # recorded once the run task is done
    assert not final.interrupt_requested
    history = await engine_harness.history(pool, chat.id)
    assert [role for role, _ in history] == ["user", "assistant"]
    partial = engine_harness.text_of(history[1][1])
    full = "echo: " + LONG_TEXT
    assert partial.startswith("echo:")
    assert full.startswith(partial)
    assert len(partial) < len(full)
    assert await engine_harness.parts_of(pool, chat.id) == []
    engine_harness.assert_chat_notifications_consistent(notes, final)


async def test_interrupt_during_a_tool_call_gives_it_a_synthetic_result(
    database_url: str, pool: asyncpg.Pool
) -> None:
    started = asyncio.Event()

    async def forever(_args: dict[str, object], _context: ToolContext) -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    tools = ToolRegistry([Tool("forever", "waits", {"type": "object"}, forever)])
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool, tools=tools):
        chat, _ = await chats.create_chat(pool, owner, "/tool forever {}")
        await asyncio.wait_for(started.wait(), 10)
        await chats.interrupt(pool, owner, chat.id)
        await engine_harness.wait_status(pool, chat.id, "waiting")
    history = await engine_harness.history(pool, chat.id)
    assert [role for role, _ in history] == ["user", "assistant", "tool"]
    call = history[1][1][0]
    assert history[2][1] == [
        {
            "type": "tool_result",
            "tool_call_id": call["id"],
            "name": "forever",
            "result": "interrupted",
            "is_error": True,
        }
    ]


async def test_promoting_a_queued_message_interrupts_and_sends_it_next(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=40)
    async with engine_harness.running_replica(database_url, pool):
        chat, _ = await chats.create_chat(pool, owner, LONG_TEXT, model_config_id=slow)
        await engine_harness.wait_status(pool, chat.id, "running")
        first = await chats.send_message(pool, owner, chat.id, "later", queue_limit=20)
        urgent = await chats.send_message(pool, owner, chat.id, "now", queue_limit=20)
        assert first.queued is not None and urgent.queued is not None
        await engine_harness.wait_parts(pool, chat.id, at_least=2)
        await chats.promote_queued(pool, owner, chat.id, urgent.queued.id)
        await engine_harness.eventually(
            lambda: _history_len(pool, chat.id, 6), message="both queued messages answered"
        )
        final = await engine_harness.wait_status(pool, chat.id, "waiting")
    history = [
        (role, engine_harness.text_of(c)) for role, c in await engine_harness.history(pool, chat.id)
    ]
    assert [role for role, _ in history] == ["user", "assistant"] * 3
    assert ("echo: " + LONG_TEXT).startswith(history[1][1]) and history[1][
        1
    ] != "echo: " + LONG_TEXT
    assert history[2:] == [
        ("user", "now"),
        ("assistant", "echo: now"),
        ("user", "later"),
        ("assistant", "echo: later"),
    ]
    assert final.generation == 1


async def _history_len(pool: asyncpg.Pool, chat_id: uuid.UUID, length: int) -> bool:
    return len(await engine_harness.history(pool, chat_id)) >= length


async def test_an_edit_mid_run_stops_the_run_which_writes_nothing_more(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=40)
    async with engine_harness.running_replica(database_url, pool) as replica:
        chat, message = await chats.create_chat(pool, owner, LONG_TEXT, model_config_id=slow)
        conn, recorder = await engine_harness.record_chats(database_url, [chat.id])
        try:
            await engine_harness.wait_parts(pool, chat.id, at_least=2)
            await chats.edit_message(pool, owner, chat.id, message.id, "short")
            await engine_harness.eventually(
                lambda: _history_len(pool, chat.id, 2), message="the edited message answered"
            )
            final = await engine_harness.wait_status(pool, chat.id, "waiting")
            notes = await recorder.drain_after_barrier(conn)
        finally:
            await conn.close()
    assert replica.stats.run_ends == {"lost": 1, "waiting": 1}
    assert final.generation == 2
    assert [
        (r, engine_harness.text_of(c)) for r, c in await engine_harness.history(pool, chat.id)
    ] == [
        ("user", "short"),
        ("assistant", "echo: short"),
    ]
    # The first run wrote no message at all (the deleted history holds only the old question).
    all_rows = await pool.fetch(
        "SELECT role, deleted FROM chat_messages WHERE chat_id = $1 ORDER BY id", chat.id
    )
    assert [(r["role"], r["deleted"]) for r in all_rows] == [
        ("user", True),
        ("user", False),
        ("assistant", False),
    ]
    engine_harness.assert_chat_notifications_consistent(notes, final)


async def test_an_archive_mid_run_stops_the_run(database_url: str, pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=40)
    async with engine_harness.running_replica(database_url, pool) as replica:
        chat, _ = await chats.create_chat(pool, owner, LONG_TEXT, model_config_id=slow)
        await engine_harness.wait_parts(pool, chat.id, at_least=2)
        await chats.update_chat(pool, owner, chat.id, archived=True)
        await engine_harness.eventually(
            lambda: _ended(replica.stats.run_ends, "lost"), message="the run stopped"
        )
    final = await engine_harness.chat_row(pool, chat.id)
    assert (final.status, final.archived) == ("waiting", True)
    assert [role for role, _ in await engine_harness.history(pool, chat.id)] == ["user"]


async def _ended(run_ends: object, key: str) -> bool:
    assert isinstance(run_ends, dict)
    return bool(run_ends.get(key))


async def test_a_reacquire_under_a_running_worker_fences_it_out(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """Another worker takes the chat (generation + 1) while the first run still streams: the
    first run stops, and neither its messages nor its parts are written from then on."""
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=30)
    async with engine_harness.running_replica(database_url, pool) as replica:
        chat, _ = await chats.create_chat(pool, owner, LONG_TEXT, model_config_id=slow)
        await engine_harness.wait_parts(pool, chat.id, at_least=2)
        usurper = uuid.uuid4()
        await pool.execute(
            "UPDATE chats SET worker_id = $2, generation = generation + 1 WHERE id = $1",
            chat.id,
            usurper,
        )
        marker = (
            await factories.create_stream_part(pool, chat_id=chat.id, generation=99, part={})
        )["id"]
        await engine_harness.eventually(
            lambda: _ended(replica.stats.run_ends, "lost"), message="the first run stopped"
        )
        await replica.flusher.flush()
    late = await pool.fetchval(
        "SELECT count(*) FROM chat_stream_parts WHERE chat_id = $1 AND generation = 1 AND id > $2",
        chat.id,
        marker,
    )
    assert late == 0
    assert [role for role, _ in await engine_harness.history(pool, chat.id)] == ["user"]
    row = await engine_harness.chat_row(pool, chat.id)
    assert (row.status, row.worker_id, row.generation) == ("running", usurper, 2)


def _retrying_stream_step(
    release: asyncio.Event,
) -> Callable[..., AsyncIterator[StreamEvent]]:
    async def fake(
        provider: Provider,
        request: ModelRequest,
        *,
        on_retry: Callable[[RetryInfo], Awaitable[None]],
    ) -> AsyncIterator[StreamEvent]:
        yield TextDelta("doomed attempt")
        await on_retry(
            RetryInfo(
                attempt=1,
                delay_ms=1000,
                retrying_at=datetime(2030, 1, 1, tzinfo=UTC),
                error=ClassifiedError(
                    kind="overloaded",
                    provider="builtin",
                    retryable=True,
                    message="busy",
                    status_code=529,
                ),
            )
        )
        await release.wait()
        async for event in stream_once(provider, request, on_retry=on_retry):
            yield event

    return fake


async def test_a_retry_voids_the_attempts_parts_and_publishes_a_retry_part(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    release = asyncio.Event()
    async with engine_harness.running_replica(
        database_url, pool, stream_step=_retrying_stream_step(release)
    ):
        chat, _ = await chats.create_chat(pool, owner, "hello")

        async def retry_part_only() -> list[asyncpg.Record] | None:
            parts = await engine_harness.parts_of(pool, chat.id)
            return parts if parts and json.loads(parts[-1]["part"])["type"] == "retry" else None

        parts = await engine_harness.eventually(retry_part_only, message="the retry part")
        assert len(parts) == 1
        assert parts[0]["message_role"] == "system"
        assert json.loads(parts[0]["part"]) == {
            "type": "retry",
            "attempt": 1,
            "delay_ms": 1000,
            "retrying_at": "2030-01-01T00:00:00+00:00",
            "kind": "overloaded",
            "provider": "builtin",
            "status_code": 529,
            "error": "busy",
        }
        release.set()
        await engine_harness.wait_status(pool, chat.id, "waiting")
    assert [
        (r, engine_harness.text_of(c)) for r, c in await engine_harness.history(pool, chat.id)
    ] == [
        ("user", "hello"),
        ("assistant", "echo: hello"),
    ]
    assert await engine_harness.parts_of(pool, chat.id) == []


async def test_a_terminal_provider_error_sets_error_with_the_classified_error(
    database_url: str, pool: asyncpg.Pool
) -> None:
    error = ClassifiedError(
        kind="auth", provider="builtin", retryable=False, message="invalid key", status_code=401
    )

    async def failing(
        provider: Provider,
        request: ModelRequest,
        *,
        on_retry: Callable[[RetryInfo], Awaitable[None]],
    ) -> AsyncIterator[StreamEvent]:
        yield TextDelta("partial")
        raise ProviderError(error)

    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool, stream_step=failing) as replica:
        chat, _ = await chats.create_chat(pool, owner, "hello")
        final = await engine_harness.wait_status(pool, chat.id, "error")
    assert replica.stats.run_ends == {"failed": 1}
    assert final.last_error == error.as_json()
    assert final.worker_id is None
    assert [role for role, _ in await engine_harness.history(pool, chat.id)] == ["user"]
    assert await engine_harness.parts_of(pool, chat.id) == []

    # A new user message makes the chat pending again, and it is answered.
    async with engine_harness.running_replica(database_url, pool):
        await chats.send_message(pool, owner, chat.id, "again", queue_limit=20)
        again = await engine_harness.wait_status(pool, chat.id, "waiting")
    assert again.last_error is None


async def test_an_unavailable_provider_is_a_config_error(
    database_url: str, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config_id = await factories.create_model_config(
        pool, provider="openai", model="gpt-x", api_key=""
    )
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool):
        chat, _ = await chats.create_chat(pool, owner, "hello", model_config_id=config_id)
        final = await engine_harness.wait_status(pool, chat.id, "error")
    assert final.last_error is not None
    assert final.last_error["kind"] == "config"


def test_run_end_values_are_the_public_names() -> None:
    assert {end.value for end in RunEnd} == {
        "waiting",
        "failed",
        "requeued",
        "lost",
        "requires_action",
    }
