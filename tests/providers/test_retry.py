"""The retry loop and stream guards (app/providers/retry.py) with scripted in-memory providers:
backoff math, Retry-After, attempt limits, guards, cancellation. Over real HTTP and the real
SDKs, the same is covered by tests/providers/test_anthropic.py and test_openai.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from app.providers.base import (
    ClassifiedError,
    ErrorKind,
    ModelConfig,
    ModelRequest,
    PromptMessage,
    ProviderError,
    ProviderEvent,
    StepFinished,
    StreamProgress,
    TextDelta,
    Usage,
)
from app.providers.retry import (
    DEFAULT_INITIAL_DELAY_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_DELAY_S,
    DEFAULT_MAX_RETRY_TOTAL_S,
    RetryInfo,
    StreamGuards,
    backoff_delay_s,
    retry_delay_s,
    stream_step,
)
from tests.fakes import FIXED_NOW, fixed_now, run_step

DONE = StepFinished("end_turn", Usage(3, 2))


def request(**options: Any) -> ModelRequest:
    return ModelRequest(
        config=ModelConfig(id="m", provider="scripted", model="scripted", options=options),
        messages=[PromptMessage("user", [{"type": "text", "text": "hi"}])],
    )


def failure(
    kind: ErrorKind = "overloaded", *, retryable: bool = True, retry_after_s: float | None = None
) -> ProviderError:
    return ProviderError(
        ClassifiedError(
            kind=kind,
            provider="scripted",
            retryable=retryable,
            message=f"scripted {kind}",
            retry_after_s=retry_after_s,
        )
    )


Attempt = Callable[[], AsyncIterator[ProviderEvent]]


@dataclass
class ScriptedProvider:
    """Each call to `stream` runs the next scripted attempt; the last one repeats."""

    attempts: list[Attempt]
    name: str = "scripted"
    started: int = 0
    closed: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        attempt = self.attempts[min(self.started, len(self.attempts) - 1)]
        self.started += 1
        try:
            async for event in attempt():
                yield event
        finally:
            self.closed += 1


def succeeds(*texts: str) -> Attempt:
    async def attempt() -> AsyncIterator[ProviderEvent]:
        for text in texts:
            yield TextDelta(text)
        yield DONE

    return attempt


def fails(error: Exception, *texts: str) -> Attempt:
    async def attempt() -> AsyncIterator[ProviderEvent]:
        for text in texts:
            yield TextDelta(text)
        raise error

    return attempt


def blocks(provider_release: Callable[[], asyncio.Event], *texts: str) -> Attempt:
    """Yields `texts`, then waits for an event nobody sets: a stream gone silent."""

    async def attempt() -> AsyncIterator[ProviderEvent]:
        for text in texts:
            yield TextDelta(text)
        await provider_release().wait()
        yield DONE

    return attempt


# --- backoff math -----------------------------------------------------------------------------


def test_backoff_doubles_from_one_second_to_sixty() -> None:
    delays = [backoff_delay_s(n, initial_delay_s=1, max_delay_s=60) for n in range(1, 10)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_stays_finite_for_absurd_attempt_numbers() -> None:
    assert backoff_delay_s(10_000, initial_delay_s=1, max_delay_s=60) == 60


def test_retry_after_is_a_floor_of_the_delay() -> None:
    error = failure(retry_after_s=7.5).error
    assert retry_delay_s(1, error, initial_delay_s=1, max_delay_s=60) == 7.5
    assert retry_delay_s(5, error, initial_delay_s=1, max_delay_s=60) == 16  # backoff is longer
    # A provider asking for more than max_delay_s gets what it asked for.
    long_wait = failure(retry_after_s=120).error
    assert retry_delay_s(1, long_wait, initial_delay_s=1, max_delay_s=60) == 120


def test_guard_timeouts_come_from_model_options_with_defaults() -> None:
    defaults = {"startup_timeout_s": 60.0, "silence_timeout_s": 90.0}
    assert StreamGuards.for_model({}, **defaults) == StreamGuards(60.0, 90.0)
    assert StreamGuards.for_model({"startup_timeout_s": 5}, **defaults) == StreamGuards(5.0, 90.0)
    # Nonsense values fall back to the default rather than disabling a guard.
    bad = {"startup_timeout_s": -1, "silence_timeout_s": "soon"}
    assert StreamGuards.for_model(bad, **defaults) == StreamGuards(60.0, 90.0)


def test_retry_info_has_the_fields_of_the_retry_event() -> None:
    info = RetryInfo(
        attempt=2,
        delay_ms=2000,
        retrying_at=FIXED_NOW,
        error=ClassifiedError("rate_limit", "openai", True, "slow down", status_code=429),
    )
    assert info.as_json() == {
        "attempt": 2,
        "delay_ms": 2000,
        "retrying_at": "2030-05-17T12:00:00+00:00",
        "kind": "rate_limit",
        "provider": "openai",
        "status_code": 429,
        "error": "slow down",
    }


# --- the loop ---------------------------------------------------------------------------------


async def test_success_without_retries_yields_the_events_and_one_step_finished() -> None:
    provider = ScriptedProvider([succeeds("a", "b")])
    run = await run_step(provider, request())
    assert run.log == [TextDelta("a"), TextDelta("b"), DONE]
    assert run.error is None
    assert provider.closed == 1


async def test_retryable_errors_back_off_then_succeed() -> None:
    provider = ScriptedProvider(
        [fails(failure()), fails(failure()), fails(failure(retry_after_s=10)), succeeds("ok")]
    )
    run = await run_step(provider, request())

    assert [(r.attempt, r.delay_ms) for r in run.retries] == [(1, 1000), (2, 2000), (3, 10_000)]
    assert [r.retrying_at for r in run.retries] == [
        FIXED_NOW + timedelta(seconds=s) for s in (1, 2, 10)
    ]
    assert run.sleeps_s == [1, 2, 10]
    assert run.events == [TextDelta("ok"), DONE]
    assert provider.started == provider.closed == 4


async def test_default_schedule_gives_up_after_25_attempts() -> None:
    provider = ScriptedProvider([fails(failure("rate_limit"))])
    run = await run_step(provider, request())

    assert provider.started == 25
    assert [r.delay_ms for r in run.retries] == [
        1000,
        2000,
        4000,
        8000,
        16000,
        32000,
        *[60_000] * 18,
    ]
    assert run.error is not None
    assert (run.error.error.kind, run.error.error.retryable) == ("rate_limit", True)
    assert run.error.error.detail is not None
    assert run.error.error.detail.startswith("gave up after 25 attempts")


async def test_non_retryable_error_is_raised_at_once() -> None:
    provider = ScriptedProvider([fails(failure("auth", retryable=False)), succeeds("never")])
    run = await run_step(provider, request())
    assert run.retries == []
    assert run.error is not None and run.error.error.kind == "auth"
    assert provider.started == 1


async def test_failed_attempts_output_comes_before_on_retry_so_the_caller_can_drop_it() -> None:
    order: list[str] = []
    provider = ScriptedProvider([fails(failure(), "part", "ial"), succeeds("whole")])

    async def on_attempt_start(n: int) -> None:
        order.append(f"attempt {n}")

    async def on_retry(info: RetryInfo) -> None:
        order.append(f"retry {info.attempt}")

    async def no_sleep(_: float) -> None:
        order.append("sleep")

    async for event in stream_step(
        provider,
        request(),
        on_retry=on_retry,
        on_attempt_start=on_attempt_start,
        sleep=no_sleep,
        now=fixed_now,
    ):
        order.append(repr(event))

    assert order == [
        "attempt 1",
        repr(TextDelta("part")),
        repr(TextDelta("ial")),
        "retry 1",
        "sleep",
        "attempt 2",
        repr(TextDelta("whole")),
        repr(DONE),
    ]


async def test_stream_without_step_finished_is_a_retryable_timeout() -> None:
    async def no_terminal() -> AsyncIterator[ProviderEvent]:
        yield TextDelta("cut")

    provider = ScriptedProvider([no_terminal, succeeds("ok")])
    run = await run_step(provider, request())
    assert [(r.error.kind, r.error.retryable) for r in run.retries] == [("timeout", True)]
    assert run.events == [TextDelta("ok"), DONE]


async def test_progress_is_dropped_and_nothing_after_step_finished_is_yielded() -> None:
    async def chatty() -> AsyncIterator[ProviderEvent]:
        yield StreamProgress()
        yield TextDelta("a")
        yield StreamProgress()
        yield DONE
        yield TextDelta("after the end")

    provider = ScriptedProvider([chatty])
    run = await run_step(provider, request())
    assert run.log == [TextDelta("a"), DONE]
    assert provider.closed == 1


async def test_unexpected_exception_from_a_provider_is_not_retried() -> None:
    provider = ScriptedProvider([fails(KeyError("bug")), succeeds("never")])
    run = await run_step(provider, request())
    assert run.error is not None
    assert (run.error.error.kind, run.error.error.retryable) == ("generic", False)
    assert provider.started == 1


async def test_a_retry_after_above_the_cap_ends_the_step_without_waiting() -> None:
    provider = ScriptedProvider([fails(failure("rate_limit", retry_after_s=3600)), succeeds("x")])
    run = await run_step(provider, request(), max_retry_after_s=120)

    # Neither slept for an hour nor retried sooner than the provider asked.
    assert run.retries == [] and run.sleeps_s == []
    assert provider.started == 1
    assert run.error is not None
    error = run.error.error
    assert error.kind == "rate_limit"  # the kind is kept
    assert error.retry_after_s == 3600
    assert "asked to wait 3600s" in error.message and "120s" in error.message
    assert error.detail is not None and "scripted rate_limit" in error.detail


async def test_a_retry_after_within_the_cap_is_waited_out() -> None:
    provider = ScriptedProvider([fails(failure("rate_limit", retry_after_s=120)), succeeds("ok")])
    run = await run_step(provider, request(), max_retry_after_s=120)
    assert run.sleeps_s == [120]
    assert run.events == [TextDelta("ok"), DONE]


async def test_the_retry_loop_is_bounded_in_time() -> None:
    provider = ScriptedProvider([fails(failure())])
    # Sleeps of 1, 2 and 4 s fit in 10 s; the fourth retry (8 s more) would not.
    run = await run_step(provider, request(), max_retry_total_s=10)

    assert run.sleeps_s == [1, 2, 4]
    assert provider.started == 4
    assert run.error is not None
    error = run.error.error
    assert (error.kind, error.retryable) == ("overloaded", True)
    assert error.detail is not None
    assert error.detail.startswith("gave up after 4 attempts in 7s")


def test_the_default_schedule_fits_in_the_default_time_bound() -> None:
    """25 attempts of the default backoff sleep about 19 minutes: the time bound only stops
    loops whose attempts themselves take long (guards firing, slow errors)."""
    total_s = sum(
        backoff_delay_s(n, initial_delay_s=DEFAULT_INITIAL_DELAY_S, max_delay_s=DEFAULT_MAX_DELAY_S)
        for n in range(1, DEFAULT_MAX_ATTEMPTS)
    )
    assert total_s < DEFAULT_MAX_RETRY_TOTAL_S


# --- guards -----------------------------------------------------------------------------------
# The guard timeouts below are tiny because the provider never answers: the test waits for the
# guard to fire, it never races it against a provider that answers "quickly enough".


async def test_startup_guard_retries_a_provider_that_never_starts() -> None:
    provider = ScriptedProvider([])
    provider.attempts = [blocks(lambda: provider.release), succeeds("ok")]
    run = await run_step(provider, request(), startup_timeout_s=0.01)

    assert [(r.error.kind, r.error.retryable) for r in run.retries] == [("startup_timeout", True)]
    assert run.events == [TextDelta("ok"), DONE]
    assert provider.closed == 2  # the abandoned attempt was closed, not left to the GC


async def test_silence_guard_retries_a_stream_that_stops_mid_way() -> None:
    provider = ScriptedProvider([])
    provider.attempts = [blocks(lambda: provider.release, "first words"), succeeds("ok")]
    run = await run_step(provider, request(), silence_timeout_s=0.01)

    assert [(r.error.kind, r.error.retryable) for r in run.retries] == [("timeout", True)]
    assert run.log[0] == TextDelta("first words")
    assert run.events == [TextDelta("ok"), DONE]


async def test_model_options_override_the_guard_defaults() -> None:
    provider = ScriptedProvider([])
    provider.attempts = [blocks(lambda: provider.release), succeeds("ok")]
    run = await run_step(provider, request(startup_timeout_s=0.01), startup_timeout_s=3600)
    assert [r.error.kind for r in run.retries] == ["startup_timeout"]


async def test_a_timeout_error_raised_by_the_provider_is_not_mistaken_for_a_guard() -> None:
    provider = ScriptedProvider([fails(TimeoutError("socket timed out")), succeeds("ok")])
    run = await run_step(provider, request())
    assert [r.error.kind for r in run.retries] == ["timeout"]
    assert run.retries[0].error.message == "the request to the provider timed out"


# --- cancellation -----------------------------------------------------------------------------


async def test_cancelling_mid_stream_propagates_and_closes_the_attempt() -> None:
    provider = ScriptedProvider([])
    provider.attempts = [blocks(lambda: provider.release, "started")]
    retries: list[RetryInfo] = []
    first_event = asyncio.Event()

    async def consume() -> None:
        async def on_retry(info: RetryInfo) -> None:
            retries.append(info)

        async for _ in stream_step(provider, request(), on_retry=on_retry):
            first_event.set()

    task = asyncio.create_task(consume())
    await first_event.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert retries == []
    assert provider.closed == 1


async def test_cancelling_during_backoff_propagates() -> None:
    provider = ScriptedProvider([fails(failure()), succeeds("never")])
    sleeping = asyncio.Event()

    async def sleep_until_cancelled(_: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()

    async def on_retry(_: RetryInfo) -> None:
        return None

    async def consume() -> None:
        async for _ in stream_step(
            provider, request(), on_retry=on_retry, sleep=sleep_until_cancelled
        ):
            pass

    task = asyncio.create_task(consume())
    await sleeping.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert provider.started == 1


# --- cancellations that are the provider's, not ours ----------------------------------------


def cancelled_inside(*texts: str) -> Attempt:
    """Yields `texts`, then raises CancelledError from inside the provider while nobody
    cancelled the caller: an HTTP/2 RST_STREAM, a cancelled anyio scope in the transport."""

    async def attempt() -> AsyncIterator[ProviderEvent]:
        for text in texts:
            yield TextDelta(text)
        raise asyncio.CancelledError("stream reset by the transport")

    return attempt


async def test_a_cancellation_inside_the_provider_is_a_retried_transport_reset() -> None:
    provider = ScriptedProvider([cancelled_inside("half an"), succeeds("whole answer")])
    run = await run_step(provider, request())

    assert run.error is None
    assert run.log[0] == TextDelta("half an")  # dropped by the caller on the retry
    assert [(r.error.kind, r.error.retryable) for r in run.retries] == [("timeout", True)]
    assert "cancelled by its transport" in run.retries[0].error.message
    assert run.events == [TextDelta("whole answer"), DONE]
    assert provider.started == provider.closed == 2


async def test_provider_cancellations_are_bounded_like_any_retryable_failure() -> None:
    provider = ScriptedProvider([cancelled_inside()])
    run = await run_step(provider, request(), max_attempts=3)
    assert provider.started == 3
    assert run.error is not None
    assert run.error.error.kind == "timeout"
    assert run.error.error.detail is not None
    assert run.error.error.detail.startswith("gave up after 3 attempts")


async def test_a_caller_cancel_that_lands_as_the_provider_fails_is_still_a_cancel() -> None:
    """The caller's Stop arrives while the provider raises its own CancelledError: the cause
    (our task is being cancelled) wins, nothing is retried."""
    retries: list[RetryInfo] = []

    async def stopped_then_reset() -> AsyncIterator[ProviderEvent]:
        yield TextDelta("a")
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # the Stop, requested while the provider is running
        raise asyncio.CancelledError("stream reset by the transport")

    provider = ScriptedProvider([stopped_then_reset, succeeds("never")])

    async def on_retry(info: RetryInfo) -> None:
        retries.append(info)

    async def consume() -> None:
        async for _ in stream_step(provider, request(), on_retry=on_retry):
            pass

    task = asyncio.create_task(consume())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert retries == []
    assert provider.started == 1


async def test_a_callers_deadline_is_not_mistaken_for_a_provider_cancellation() -> None:
    provider = ScriptedProvider([])
    provider.attempts = [blocks(lambda: provider.release, "started")]

    async def on_retry(_: RetryInfo) -> None:
        raise AssertionError("the caller's deadline must not be retried")

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            async for _ in stream_step(provider, request(), on_retry=on_retry):
                pass
    assert provider.started == 1


async def test_the_silence_guard_does_not_count_the_time_the_caller_spends() -> None:
    """The guard covers the waits for the provider only: a caller slower than the silence
    timeout between events (a full part buffer, say) never trips it."""
    provider = ScriptedProvider([succeeds("a", "b", "c")])

    async def on_retry(info: RetryInfo) -> None:
        raise AssertionError(f"no retry expected: {info}")

    events = []
    async for event in stream_step(provider, request(), on_retry=on_retry, silence_timeout_s=0.01):
        events.append(event)
        await asyncio.sleep(0.03)  # the caller's own work, three silence timeouts long
    assert events == [TextDelta("a"), TextDelta("b"), TextDelta("c"), DONE]


async def test_the_silence_guard_applies_after_a_long_startup_timeout() -> None:
    provider = ScriptedProvider([])
    provider.attempts = [blocks(lambda: provider.release, "first"), succeeds("ok")]
    run = await run_step(provider, request(), startup_timeout_s=3600, silence_timeout_s=0.01)
    assert [r.error.kind for r in run.retries] == ["timeout"]
    assert run.events == [TextDelta("ok"), DONE]


def converts_the_cancellation(into: Exception) -> Attempt:
    """Waits for the next event until cancelled, and raises `into` instead of the cancellation
    (as a transport may)."""

    async def attempt() -> AsyncIterator[ProviderEvent]:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise into from None
        yield DONE

    return attempt


async def test_a_guard_cancellation_the_provider_turns_into_a_timeout_error_is_the_guard() -> None:
    provider = ScriptedProvider([converts_the_cancellation(TimeoutError()), succeeds("ok")])
    run = await run_step(provider, request(), startup_timeout_s=0.01)
    assert [r.error.kind for r in run.retries] == ["startup_timeout"]
    assert run.events == [TextDelta("ok"), DONE]


async def test_the_guards_cancel_request_never_outlives_the_wait() -> None:
    """A provider that turns the guard's cancellation into its own error: the step goes on,
    and the task is not left with a pending cancel request (later deadlines and the
    cancellation-cause checks count them)."""
    provider = ScriptedProvider(
        [converts_the_cancellation(ConnectionResetError("reset")), succeeds("ok")]
    )
    run = await run_step(provider, request(), startup_timeout_s=0.01)
    assert len(run.retries) == 1
    assert run.events == [TextDelta("ok"), DONE]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
