"""Stream one model step with chatd's retries and stream guards (docs/providers.md,
"Retry loop and guards").

The SDKs' own retries are off; this loop retries instead, so that every retry is visible: it
awaits `on_retry` before each one, which the chat loop publishes as a `retry` event.

Guards, both retryable:
- startup: no sign of life (any event, including `StreamProgress`) within `startup_timeout_s`
  of starting an attempt → `startup_timeout`;
- silence: no sign of life for `silence_timeout_s` once the stream has started → `timeout`.
Each guard covers only the wait for the provider's next event, never the time our caller
spends handling the event we gave it.

Cancellation is told apart by its cause, never by its type. A `CancelledError` while our own
task is being cancelled (`Task.cancelling()` > 0: Stop, shutdown, the caller's deadline) is
the caller's and always propagates. One that arises inside the provider while nobody cancelled
us (an HTTP/2 RST_STREAM, a cancelled anyio scope inside the transport) is the provider's
failure: a retryable transport reset (`errors.provider_cancellation`), like a dropped stream.

Bounds: a Retry-After above `max_retry_after_s` is not waited out (a provider, or a wrong base
URL, could otherwise park a run slot for hours) and never retried sooner either: the step ends
with that error. The whole loop gives up once its next retry would start later than
`max_retry_total_s` after its first attempt began.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from app.providers.base import (
    ClassifiedError,
    ErrorKind,
    ModelRequest,
    Provider,
    ProviderError,
    ProviderEvent,
    StepFinished,
    StreamEvent,
    StreamProgress,
)
from app.providers.classify import classify, provider_cancellation, utc_now

T = TypeVar("T")

DEFAULT_STARTUP_TIMEOUT_S = 60.0
DEFAULT_SILENCE_TIMEOUT_S = 90.0
DEFAULT_MAX_ATTEMPTS = 25
DEFAULT_INITIAL_DELAY_S = 1.0
DEFAULT_MAX_DELAY_S = 60.0
# The longest Retry-After we wait out: twice the longest backoff. Rate limits ask for seconds;
# a provider asking for more than this is down for longer than a chat should hold a run slot.
DEFAULT_MAX_RETRY_AFTER_S = 120.0
# The retry loop's bound in wall time, attempts included. The default schedule sleeps about
# 19 minutes in 25 attempts; this leaves room for the attempts themselves and stops a loop whose
# attempts each run into a guard (up to a minute or more each) from holding a slot for an hour.
DEFAULT_MAX_RETRY_TOTAL_S = 30 * 60.0


@dataclass(frozen=True)
class RetryInfo:
    """One retry about to happen. `attempt` counts retries: 1 is the first retry (the second
    try), so it is also the number of attempts that failed so far."""

    attempt: int
    delay_ms: int
    retrying_at: datetime  # UTC
    error: ClassifiedError

    def as_json(self) -> dict[str, Any]:
        """The fields of the `retry` stream event (docs/api.md, "Frames"), minus `type` and
        `chat_id`."""
        return {
            "attempt": self.attempt,
            "delay_ms": self.delay_ms,
            "retrying_at": self.retrying_at.isoformat(),
            "kind": self.error.kind,
            "provider": self.error.provider,
            "status_code": self.error.status_code,
            "error": self.error.message,
        }


@dataclass(frozen=True)
class StreamGuards:
    startup_timeout_s: float
    silence_timeout_s: float

    @classmethod
    def for_model(
        cls, options: dict[str, Any], *, startup_timeout_s: float, silence_timeout_s: float
    ) -> StreamGuards:
        """The given defaults, overridden by the model config's options of the same names."""
        return cls(
            startup_timeout_s=_positive_float(options.get("startup_timeout_s"), startup_timeout_s),
            silence_timeout_s=_positive_float(options.get("silence_timeout_s"), silence_timeout_s),
        )


def backoff_delay_s(attempt: int, *, initial_delay_s: float, max_delay_s: float) -> float:
    """Exponential backoff before retry number `attempt` (1-based): 1, 2, 4, ... capped."""
    # Capping the exponent keeps 2**n finite for absurd attempt counts.
    return min(max_delay_s, initial_delay_s * 2.0 ** min(attempt - 1, 62))


def retry_delay_s(
    attempt: int, error: ClassifiedError, *, initial_delay_s: float, max_delay_s: float
) -> float:
    """The backoff, but never sooner than the provider's Retry-After (retrying earlier than the
    provider asked only earns another 429; `stream_step` refuses a Retry-After above its cap
    instead of shortening it)."""
    delay_s = backoff_delay_s(attempt, initial_delay_s=initial_delay_s, max_delay_s=max_delay_s)
    if error.retry_after_s is not None:
        delay_s = max(delay_s, error.retry_after_s)
    return delay_s


async def stream_step(
    provider: Provider,
    request: ModelRequest,
    *,
    on_retry: Callable[[RetryInfo], Awaitable[None]],
    on_attempt_start: Callable[[int], Awaitable[None]] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    now: Callable[[], datetime] = utc_now,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    silence_timeout_s: float = DEFAULT_SILENCE_TIMEOUT_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    initial_delay_s: float = DEFAULT_INITIAL_DELAY_S,
    max_delay_s: float = DEFAULT_MAX_DELAY_S,
    max_retry_after_s: float = DEFAULT_MAX_RETRY_AFTER_S,
    max_retry_total_s: float = DEFAULT_MAX_RETRY_TOTAL_S,
    monotonic: Callable[[], float] = time.monotonic,
) -> AsyncIterator[StreamEvent]:
    """Yield the events of one model step, retrying retryable failures; the last event is the
    step's `StepFinished`. Raises `ProviderError` for a non-retryable error or when
    `max_attempts` attempts failed (the last attempt's error, its `detail` saying so).

    **Partial output.** Events are yielded as they arrive, so a failed attempt may already have
    yielded text, reasoning or even tool calls. When `on_retry` is awaited, everything yielded
    since the last `on_attempt_start` belongs to the failed attempt and the caller must drop it
    (discard buffered parts, publish the `retry` event); the next attempt starts from scratch.
    `on_attempt_start(n)` (n = 1, 2, ...) is awaited before every attempt, the first included,
    for callers that prefer to reset their buffer there.

    `startup_timeout_s`/`silence_timeout_s` are defaults; a model's `config.options` of the
    same names override them. `sleep`, `now` and `monotonic` are injectable so tests need not
    wait out the backoff. A Retry-After above `max_retry_after_s`, or a retry that would start
    more than `max_retry_total_s` after the first attempt, ends the step with the attempt's
    error (its kind kept, the message or detail saying why). Cancellation of our task
    (interrupt, shutdown, a caller's deadline) propagates from wherever it lands, including the
    backoff sleep; it is never retried or converted. A CancelledError raised inside the
    provider while our task is not being cancelled is retried as a transport reset."""
    guards = StreamGuards.for_model(
        request.config.options,
        startup_timeout_s=startup_timeout_s,
        silence_timeout_s=silence_timeout_s,
    )
    failed = 0
    started_at = monotonic()
    while True:
        if on_attempt_start is not None:
            await on_attempt_start(failed + 1)
        try:
            async with _closing(_guarded(provider.stream(request), guards, provider.name)) as step:
                async for event in step:
                    yield event
        except asyncio.CancelledError as cancelled:
            if _being_cancelled():
                raise  # Stop, shutdown, a caller's deadline: never swallowed, never retried
            error = provider_cancellation(provider.name, cancelled)
        except Exception as exc:
            error = classify(exc, provider.name, now=now)
        else:
            return
        failed += 1
        if not error.retryable:
            raise ProviderError(error)
        if failed >= max_attempts:
            raise ProviderError(_gave_up(error, f"gave up after {failed} attempts"))
        if error.retry_after_s is not None and error.retry_after_s > max_retry_after_s:
            raise ProviderError(_retry_after_too_long(error, max_retry_after_s))
        delay_s = retry_delay_s(
            failed, error, initial_delay_s=initial_delay_s, max_delay_s=max_delay_s
        )
        elapsed_s = monotonic() - started_at
        if elapsed_s + delay_s > max_retry_total_s:
            raise ProviderError(
                _gave_up(
                    error,
                    f"gave up after {failed} attempts in {elapsed_s:.0f}s: the next retry would "
                    f"start after the {max_retry_total_s:g}s bound of the retry loop",
                )
            )
        await on_retry(
            RetryInfo(
                attempt=failed,
                delay_ms=round(delay_s * 1000),
                retrying_at=now() + timedelta(seconds=delay_s),
                error=error,
            )
        )
        await sleep(delay_s)


async def _guarded(
    events: AsyncIterator[ProviderEvent], guards: StreamGuards, provider: str
) -> AsyncGenerator[StreamEvent]:
    """`events` up to and including its StepFinished, without StreamProgress. Fails with a
    retryable error when the provider is silent too long or ends before its StepFinished.
    Closes `events` however it ends."""
    async with _closing(events):
        watchdog = _Watchdog(guards.startup_timeout_s)
        kind: ErrorKind = "startup_timeout"
        try:
            while True:
                watchdog.waiting()
                try:
                    event = await anext(events)
                except BaseException as exc:
                    # Only our own deadline is a guard: its cancellation (or a TimeoutError the
                    # provider made of it); anyone else's cancellation propagates.
                    expired, cancelled_by_others = watchdog.wait_ended()
                    if expired and (
                        isinstance(exc, TimeoutError)
                        or (isinstance(exc, asyncio.CancelledError) and not cancelled_by_others)
                    ):
                        raise ProviderError(
                            _guard_error(kind, provider, watchdog.timeout_s)
                        ) from None
                    if isinstance(exc, StopAsyncIteration):
                        raise ProviderError(_ended_early(provider)) from None
                    raise
                watchdog.wait_ended()
                if kind == "startup_timeout":
                    watchdog.set_timeout(guards.silence_timeout_s)
                    kind = "timeout"
                if isinstance(event, StreamProgress):
                    continue
                yield event
                if isinstance(event, StepFinished):
                    return  # exactly one StepFinished: whatever follows is not part of the step
        finally:
            watchdog.close()


class _Watchdog:
    """The guard's deadline on each wait for the provider's next event, without a timer per
    event: a stream of thousands of deltas would otherwise schedule and cancel one timer per
    delta (the cancelled handles stay in the event loop's heap until they come due). One timer
    is armed when a wait starts and none is; when it fires it checks the wait in progress: past
    its deadline it cancels the task (like `asyncio.timeout`, and undone the same way), before
    it the timer is armed again for that wait's deadline, and between waits (the caller
    handling an event) it lets the next wait arm it. A wait is never cut short, and never
    outlives its deadline by more than the loop's own timer precision."""

    def __init__(self, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self.timeout_s = timeout_s
        self._since: float | None = None  # when the wait in progress started
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    def waiting(self) -> None:
        self._since = since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(since + self.timeout_s, self._check)

    def set_timeout(self, timeout_s: float) -> None:
        """A new timeout for the next waits (a timer armed for the old one may be too late)."""
        self.timeout_s = timeout_s
        self.close()

    def wait_ended(self) -> tuple[bool, bool]:
        """End the wait, however it ended: (whether our deadline expired during it, whether
        someone else asked to cancel the task too). Our cancel request is withdrawn here, as
        `asyncio.timeout` does on exit, so it never outlives the wait."""
        self._since = None
        if not self._expired:
            return False, False
        self._expired = False
        return True, self._task.uncancel() > self._cancelling

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        since = self._since
        if since is None:
            return  # between waits: the next wait arms the timer
        due = since + self.timeout_s
        if self._loop.time() >= due:
            self._expired = True
            self._task.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)


@contextlib.asynccontextmanager
async def _closing(events: AsyncIterator[T]) -> AsyncGenerator[AsyncIterator[T]]:
    """Close `events` on exit when it is an async generator (every provider's stream is), so
    an abandoned attempt releases its HTTP response now rather than at garbage collection."""
    try:
        yield events
    finally:
        if isinstance(events, AsyncGenerator):
            await events.aclose()


def _being_cancelled() -> bool:
    """Whether someone asked to cancel the task we run in (asyncio counts pending cancel
    requests; `asyncio.timeout` and TaskGroup undo theirs once handled)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _gave_up(error: ClassifiedError, why: str) -> ClassifiedError:
    return dataclasses.replace(error, detail=f"{why}; last: {error.detail or '-'}")


def _retry_after_too_long(error: ClassifiedError, max_retry_after_s: float) -> ClassifiedError:
    """The attempt's error, terminal: its kind and status kept, the message saying why it was
    not retried (the provider's own message moves to the detail)."""
    asked_s = error.retry_after_s
    assert asked_s is not None
    return dataclasses.replace(
        error,
        message=(
            f"the provider asked to wait {asked_s:g}s before retrying, more than the "
            f"{max_retry_after_s:g}s chatd waits; try again later"
        ),
        detail=f"{error.message}; {error.detail or '-'}",
    )


def _guard_error(kind: ErrorKind, provider: str, timeout_s: float) -> ClassifiedError:
    if kind == "startup_timeout":
        message = f"the provider sent nothing for {timeout_s:g}s after the request"
    else:
        message = f"the provider's stream was silent for {timeout_s:g}s"
    return ClassifiedError(kind=kind, provider=provider, retryable=True, message=message)


def _ended_early(provider: str) -> ClassifiedError:
    return ClassifiedError(
        kind="timeout",
        provider=provider,
        retryable=True,
        message="the provider's stream ended before its terminal event",
    )


def _positive_float(raw: object, default: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw <= 0:
        return default
    return float(raw)
