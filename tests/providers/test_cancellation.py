"""A provider-side cancellation through the whole run (app/engine/chatloop.py with the retry loop of
app/providers/retry.py, as the service wires it): a CancelledError raised inside the provider
while nobody cancelled the step is retried and the chat gets its whole answer; a user's Stop
during the same kind of stream is still a Stop. Over the real SDKs, the same fault is in
test_providers_{anthropic,openai}.py (`CancelMidStream`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from app.providers import retry
from app.providers.base import ModelRequest, Provider, ProviderEvent, StreamEvent
from app.providers.retry import RetryInfo
from app.state import chats
from tests import engine_harness, factories

LONG_TEXT = " ".join(f"word{i}" for i in range(40))


@dataclass
class ResetOnce:
    """The wrapped provider, except that its first stream is cut after `after_events` events
    by a CancelledError from inside (an HTTP/2 RST_STREAM, a cancelled anyio scope)."""

    inner: Provider
    after_events: int = 2
    streams: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.inner.name

    async def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        self.streams += 1
        first = self.streams == 1
        sent = 0
        async for event in self.inner.stream(request):
            if first and sent == self.after_events:
                raise asyncio.CancelledError("stream reset by the transport")
            sent += 1
            yield event


def retrying_with_resets(
    retries: list[RetryInfo],
) -> Callable[..., AsyncIterator[StreamEvent]]:
    """The service's seam (retry.stream_step), with the first stream of each step reset and a
    backoff that does not wait."""

    async def no_sleep(_: float) -> None:
        return None

    def stream_step(
        provider: Provider,
        request: ModelRequest,
        *,
        on_retry: Callable[[RetryInfo], Awaitable[None]],
    ) -> AsyncIterator[StreamEvent]:
        async def recorded(info: RetryInfo) -> None:
            retries.append(info)
            await on_retry(info)

        return retry.stream_step(ResetOnce(provider), request, on_retry=recorded, sleep=no_sleep)

    return stream_step


async def test_a_provider_side_cancellation_is_retried_and_the_chat_gets_its_answer(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    retries: list[RetryInfo] = []
    async with engine_harness.running_replica(
        database_url, pool, stream_step=retrying_with_resets(retries)
    ) as replica:
        chat, _ = await chats.create_chat(pool, owner, "hello there")
        final = await engine_harness.wait_status(pool, chat.id, "waiting", "error")

    assert final.status == "waiting", final.last_error
    assert final.last_error is None
    assert [(r.error.kind, r.error.retryable) for r in retries] == [("timeout", True)]
    assert await engine_harness.history(pool, chat.id) == [
        ("user", [{"type": "text", "text": "hello there"}]),
        ("assistant", [{"type": "text", "text": "echo: hello there"}]),
    ]
    assert replica.stats.run_ends == {"waiting": 1}


async def test_a_stop_during_a_retrying_stream_is_still_a_stop(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    model = await factories.create_model_config(pool, token_delay_ms=50)
    async with engine_harness.running_replica(
        database_url, pool, stream_step=retry.stream_step
    ) as replica:
        chat, _ = await chats.create_chat(pool, owner, LONG_TEXT, model_config_id=model)
        await engine_harness.wait_parts(pool, chat.id)
        await chats.interrupt(pool, owner, chat.id)
        final = await engine_harness.wait_status(pool, chat.id, "waiting", "error")

    assert final.status == "waiting", final.last_error
    assert final.last_error is None
    history = await engine_harness.history(pool, chat.id)
    assert [role for role, _ in history] == ["user", "assistant"]
    assert f"echo: {LONG_TEXT}".startswith(engine_harness.text_of(history[1][1]))
    assert replica.stats.run_ends == {"waiting": 1}
