"""Spend that no step message carries (issue 9, item 18): title requests, the partial step of an
interrupted turn, attempts that failed or were retried after the provider reported usage. All of
it is recorded with its cost, and spend limits see it."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from app.db.queries import project_queries
from app.engine.replica import Replica
from app.engine.step import stream_once
from app.providers.base import (
    ClassifiedError,
    ModelRequest,
    Provider,
    StreamEvent,
    TextDelta,
    Usage,
)
from app.providers.catalog import close_providers
from app.providers.retry import RetryInfo
from app.state import chats
from app.state.model import Chat
from tests import engine_harness, factories
from tests.fakes import Behaviour, RecordedRequest, SilenceMidStream, Step, StreamError, running
from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.scenarios import kind_of

Q = project_queries()

# Prices of the fake model: 1 micro per input token, 2 per output token.
PRICES: dict[str, Any] = {"input_micros_per_mtok": 1_000_000, "output_micros_per_mtok": 2_000_000}


@pytest.fixture(autouse=True)
async def _close_sdk_clients() -> AsyncIterator[None]:
    yield
    await close_providers()


async def _runs_ended(replica: Replica, count: int) -> bool:
    return sum(replica.stats.run_ends.values()) >= count


async def _usage_rows(pool: asyncpg.Pool, chat_id: uuid.UUID) -> list[tuple[Any, ...]]:
    rows = await pool.fetch(
        "SELECT kind, input_tokens, output_tokens, cost_micros FROM chat_usage"
        " WHERE chat_id = $1 ORDER BY id",
        chat_id,
    )
    return [tuple(row) for row in rows]


async def _spent(pool: asyncpg.Pool, chat: Chat) -> int:
    spent: int = await pool.fetchval(
        Q.sql("usage_spent_since"),
        chat.organization_id,
        chat.owner_id,
        datetime(2000, 1, 1, tzinfo=UTC),
    )
    return spent


async def test_a_title_request_is_spend(database_url: str, pool: asyncpg.Pool) -> None:
    def respond(request: RecordedRequest) -> Behaviour:
        if kind_of(request) == "title":
            return Step(text="Capital of France", input_tokens=40, output_tokens=4)
        return Step(text="Paris.", input_tokens=25, output_tokens=7)

    owner = await factories.create_owner(pool)
    server = FakeAnthropicServer(responder=respond)
    async with running(server), engine_harness.running_replica(database_url, pool) as replica:
        model = await factories.create_fake_model_config(pool, server.base_url, **PRICES)
        chat, _ = await chats.create_chat(pool, owner, "Capital of France?", model_config_id=model)
        await engine_harness.eventually(lambda: _runs_ended(replica, 1), message="the run ended")
    assert (await engine_harness.chat_row(pool, chat.id)).title == "Capital of France"
    assert await _usage_rows(pool, chat.id) == [("title", 40, 4, 40 + 2 * 4)]
    # The spend limits' sum: the answer (25 + 2 * 7) and the title.
    assert await _spent(pool, chat) == 39 + 48
    by_kind = await pool.fetch(
        "SELECT kind, sum(cost_micros)::bigint AS cost FROM chat_spend WHERE owner_id = $1"
        " GROUP BY kind ORDER BY kind",
        owner.user_id,
    )
    assert [(r["kind"], r["cost"]) for r in by_kind] == [("message:assistant", 39), ("title", 48)]


async def test_the_partial_step_of_an_interrupted_turn_carries_the_reported_usage(
    database_url: str, pool: asyncpg.Pool
) -> None:
    def respond(request: RecordedRequest) -> Behaviour:
        if kind_of(request) == "title":
            return Step(text="A title", input_tokens=0, output_tokens=0)
        return SilenceMidStream(
            Step(text="this answer will be cut off", input_tokens=300, output_tokens=50),
            after_frames=5,
        )

    owner = await factories.create_owner(pool)
    server = FakeAnthropicServer(responder=respond)
    async with running(server), engine_harness.running_replica(database_url, pool):
        model = await factories.create_fake_model_config(pool, server.base_url, **PRICES)
        chat, _ = await chats.create_chat(pool, owner, "tell me more", model_config_id=model)
        await engine_harness.wait_parts(pool, chat.id, at_least=1)
        await chats.interrupt(pool, owner, chat.id)
        await engine_harness.wait_status(pool, chat.id, "waiting")
    message = await pool.fetchrow(
        "SELECT content, input_tokens, cost_micros FROM chat_messages"
        " WHERE chat_id = $1 AND role = 'assistant'",
        chat.id,
    )
    assert message is not None
    assert engine_harness.text_of(json.loads(message["content"]))  # the partial text
    # Anthropic's message_start reported the prompt: it was read (and billed) all the same.
    assert message["input_tokens"] == 300
    assert message["cost_micros"] >= 300
    assert await _spent(pool, chat) == message["cost_micros"]


async def test_a_failed_attempt_is_spend(database_url: str, pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    server = FakeAnthropicServer()
    server.script(
        StreamError(
            "invalid_request_error",
            step=Step(text="this answer will fail", input_tokens=120, output_tokens=9),
        )
    )
    async with running(server), engine_harness.running_replica(database_url, pool):
        model = await factories.create_fake_model_config(pool, server.base_url, **PRICES)
        chat, _ = await chats.create_chat(pool, owner, "fail me", model_config_id=model)
        final = await engine_harness.wait_status(pool, chat.id, "error")
    assert final.last_error is not None
    ((kind, input_tokens, _output, cost),) = await _usage_rows(pool, chat.id)
    assert (kind, input_tokens) == ("failed_attempt", 120)
    assert cost >= 120
    assert await _spent(pool, chat) == cost


async def test_a_retried_attempt_is_spend(database_url: str, pool: asyncpg.Pool) -> None:
    async def retried_once(
        provider: Provider,
        request: ModelRequest,
        *,
        on_retry: Callable[[RetryInfo], Awaitable[None]],
    ) -> AsyncIterator[StreamEvent]:
        yield TextDelta("doomed attempt")
        assert request.meter is not None
        request.meter.report(Usage(input_tokens=50, output_tokens=3))
        await on_retry(
            RetryInfo(
                attempt=1,
                delay_ms=0,
                retrying_at=datetime(2030, 1, 1, tzinfo=UTC),
                error=ClassifiedError(
                    kind="overloaded", provider="builtin", retryable=True, message="busy"
                ),
            )
        )
        async for event in stream_once(provider, request, on_retry=on_retry):
            yield event

    owner = await factories.create_owner(pool)
    model = await factories.create_model_config(
        pool, input_micros_per_mtok=1_000_000, output_micros_per_mtok=2_000_000
    )
    async with engine_harness.running_replica(database_url, pool, stream_step=retried_once):
        chat, _ = await chats.create_chat(pool, owner, "hello", model_config_id=model)
        await engine_harness.wait_status(pool, chat.id, "waiting")
    assert await _usage_rows(pool, chat.id) == [("failed_attempt", 50, 3, 56)]
    answer_cost = await pool.fetchval(
        "SELECT cost_micros FROM chat_messages WHERE chat_id = $1 AND role = 'assistant'", chat.id
    )
    assert await _spent(pool, chat) == answer_cost + 56
