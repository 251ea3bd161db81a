"""Local HTTP servers that speak the model providers' real wire formats, so tests drive the
official SDKs over real HTTP (docs/architecture.md, "How chatd is tested").

Each server answers every request with the next behaviour of its plan (`script(...)`): a model
step to stream, or a fault. When the plan is empty, a `responder` (if set) decides from the
request itself: a "model" that reads what it was sent (tool results, the system prompt) and
answers accordingly, for scenarios whose request order is not known in advance (sub-agents,
several chats at once). A server records every request it got, so a test can assert what the
SDK actually sent. The wire formats live in anthropic_server.py and openai_server.py; the
plan, the recording and the fault mechanics are shared here.

A fault that holds a response (`SlowStart`, `SilenceMidStream`) waits on an `asyncio.Event`,
never on a timer: the test releases it, or stopping the server does.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web

from app.providers.base import ModelRequest, Provider, ProviderError, StreamEvent
from app.providers.retry import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_RETRY_AFTER_S,
    DEFAULT_MAX_RETRY_TOTAL_S,
    DEFAULT_SILENCE_TIMEOUT_S,
    DEFAULT_STARTUP_TIMEOUT_S,
    RetryInfo,
    stream_step,
)

# The clock of tests that assert Retry-After dates and `retrying_at`.
FIXED_NOW = datetime(2030, 5, 17, 12, 0, 0, tzinfo=UTC)


def fixed_now() -> datetime:
    return FIXED_NOW


@dataclass(frozen=True)
class ToolUse:
    id: str
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Step:
    """A successful model step, which each server encodes in its own wire format."""

    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolUse, ...] = ()
    input_tokens: int = 25
    output_tokens: int = 7
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


# With the default `after_frames` of 5, both servers have sent two words of this before a fault.
PARTIAL = Step(text="this answer will be cut off")


@dataclass(frozen=True)
class HttpError:
    """An error response. `error_type=None` sends a non-JSON body, like a proxy's error page."""

    status: int
    error_type: str | None = "api_error"
    message: str = "scripted failure"
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamError:
    """A 200 stream that carries an error event after `after_frames` frames of `step`."""

    error_type: str
    message: str = "scripted stream failure"
    code: str | None = None
    step: Step = PARTIAL
    after_frames: int = 5


@dataclass(frozen=True)
class DropMidBody:
    """`after_frames` frames, then the server closes the connection with the chunked body
    incomplete: what a provider-side reset looks like to the client."""

    step: Step = PARTIAL
    after_frames: int = 5


@dataclass(frozen=True)
class EndEarly:
    """`after_frames` frames, then a clean end of the body, without the terminal event."""

    step: Step = PARTIAL
    after_frames: int = 5


@dataclass(frozen=True)
class SlowStart:
    """Hold the response until `release` is set: before the status line and headers when
    `send_headers` is false, else between the headers and the first frame."""

    step: Step
    release: asyncio.Event = field(default_factory=asyncio.Event)
    send_headers: bool = True


@dataclass(frozen=True)
class SilenceMidStream:
    """`after_frames` frames, then nothing until `release` is set, then the rest."""

    step: Step = PARTIAL
    after_frames: int = 5
    release: asyncio.Event = field(default_factory=asyncio.Event)


Behaviour = Step | HttpError | StreamError | DropMidBody | EndEarly | SlowStart | SilenceMidStream


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: Mapping[str, str]  # lower-cased names
    body: dict[str, Any]


Responder = Callable[[RecordedRequest], Behaviour]


class FakeProviderServer(ABC):
    """An aiohttp server on 127.0.0.1 and a random port. Use `running(server)`."""

    path: str

    def __init__(self, responder: Responder | None = None) -> None:
        self.responder = responder
        self.plan: deque[Behaviour] = deque()
        self.requests: list[RecordedRequest] = []
        self.origin = ""
        self._runner: web.AppRunner | None = None
        self._holds: list[asyncio.Event] = []
        self._stopping = False

    def script(self, *behaviours: Behaviour) -> None:
        self.plan.extend(behaviours)

    @abstractmethod
    def frames(self, step: Step, model: str) -> list[bytes]:
        """The whole successful stream of `step`, one SSE frame per item."""

    @abstractmethod
    def error_body(self, error: HttpError) -> dict[str, Any]:
        """The JSON body of an error response."""

    @abstractmethod
    def stream_error_frame(self, error: StreamError) -> bytes:
        """An error event inside a 200 stream."""

    @abstractmethod
    def response_headers(self) -> dict[str, str]:
        """Headers the real API sends on every response (request ids)."""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.origin = f"http://{host}:{port}"

    async def stop(self) -> None:
        self._stopping = True
        for hold in self._holds:  # let held handlers finish, so shutdown waits for nothing
            hold.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:  # noqa: PLR0911  one return per scripted behaviour
        body = await request.json()
        headers = {name.lower(): value for name, value in request.headers.items()}
        recorded = RecordedRequest(request.path, headers, body)
        self.requests.append(recorded)
        if self.plan:
            behaviour = self.plan.popleft()
        elif self.responder is not None:
            behaviour = self.responder(recorded)
        else:
            behaviour = HttpError(500, message="plan is empty")
        model = str(body.get("model", ""))

        if isinstance(behaviour, HttpError):
            return self._error_response(behaviour)
        if isinstance(behaviour, Step):
            return await self._stream(request, self.frames(behaviour, model))
        if isinstance(behaviour, StreamError):
            frames = self.frames(behaviour.step, model)[: behaviour.after_frames]
            return await self._stream(request, [*frames, self.stream_error_frame(behaviour)])
        if isinstance(behaviour, EndEarly):
            frames = self.frames(behaviour.step, model)[: behaviour.after_frames]
            return await self._stream(request, frames)
        if isinstance(behaviour, DropMidBody):
            frames = self.frames(behaviour.step, model)[: behaviour.after_frames]
            dropped = await self._stream(request, frames, finish=False)
            assert request.transport is not None
            # close() flushes what was written, then ends the connection mid chunked body.
            request.transport.close()
            return dropped
        if isinstance(behaviour, SlowStart):
            response: web.StreamResponse | None = None
            if behaviour.send_headers:
                response = await self._stream(request, [], finish=False)
            if not await self._held(request, behaviour.release):
                # StreamResponse is a MutableMapping, so test it against None, not for truth.
                return response if response is not None else web.Response(status=499)
            return await self._stream(request, self.frames(behaviour.step, model), response)
        frames = self.frames(behaviour.step, model)
        started = await self._stream(request, frames[: behaviour.after_frames], finish=False)
        if not await self._held(request, behaviour.release):
            return started
        return await self._stream(request, frames[behaviour.after_frames :], started)

    async def _held(self, request: web.Request, release: asyncio.Event) -> bool:
        """Wait for `release`; False when the server is stopping (the connection is closed)."""
        self._holds.append(release)
        await release.wait()
        if self._stopping:
            if request.transport is not None:
                request.transport.close()
            return False
        return True

    def _error_response(self, error: HttpError) -> web.Response:
        headers = {**self.response_headers(), **error.headers}
        if error.error_type is None:
            return web.Response(
                status=error.status,
                text=f"<html><body><h1>{error.status}</h1>{error.message}</body></html>",
                content_type="text/html",
                headers=headers,
            )
        return web.Response(
            status=error.status,
            text=json.dumps(self.error_body(error)),
            content_type="application/json",
            headers=headers,
        )

    async def _stream(
        self,
        request: web.Request,
        frames: list[bytes],
        response: web.StreamResponse | None = None,
        *,
        finish: bool = True,
    ) -> web.StreamResponse:
        if response is None:
            response = web.StreamResponse(
                status=200,
                headers={
                    **self.response_headers(),
                    "Content-Type": "text/event-stream; charset=utf-8",
                    "Cache-Control": "no-cache",
                },
            )
        try:
            if not response.prepared:
                await response.prepare(request)
            for frame in frames:
                await response.write(frame)
            if finish:
                await response.write_eof()
        except ConnectionResetError:
            pass  # the client gave up on this response (a guard fired): nothing left to say
        return response


def sse(data: Mapping[str, Any] | str, *, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {payload}\n\n".encode()


def word_chunks(text: str) -> list[str]:
    """`text` in word-sized pieces that keep their leading space, as models stream it."""
    words = text.split(" ")
    return [words[0], *(" " + word for word in words[1:])] if text else []


def json_fragments(args: Mapping[str, Any]) -> list[str]:
    """Tool arguments as streamed: the JSON text split at arbitrary points."""
    text = json.dumps(args, separators=(",", ":"))
    cut = max(1, len(text) // 3)
    return [text[:cut], text[cut : 2 * cut], text[2 * cut :]]


ServerT = TypeVar("ServerT", bound=FakeProviderServer)


@asynccontextmanager
async def running(server: ServerT) -> AsyncIterator[ServerT]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@dataclass
class StepRun:
    """What `run_step` saw, in order: events and retries interleaved in `log`."""

    log: list[StreamEvent | RetryInfo] = field(default_factory=list)
    sleeps_s: list[float] = field(default_factory=list)
    error: ProviderError | None = None

    @property
    def retries(self) -> list[RetryInfo]:
        return [entry for entry in self.log if isinstance(entry, RetryInfo)]

    @property
    def events(self) -> list[StreamEvent]:
        """The events of the last attempt: what a caller keeps after dropping failed ones."""
        kept: list[StreamEvent] = []
        for entry in self.log:
            if isinstance(entry, RetryInfo):
                kept.clear()
            else:
                kept.append(entry)
        return kept

    @property
    def text(self) -> str:
        return "".join(getattr(event, "text", "") for event in self.events)


async def run_step(
    provider: Provider,
    request: ModelRequest,
    *,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    silence_timeout_s: float = DEFAULT_SILENCE_TIMEOUT_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    max_retry_after_s: float = DEFAULT_MAX_RETRY_AFTER_S,
    max_retry_total_s: float = DEFAULT_MAX_RETRY_TOTAL_S,
) -> StepRun:
    """Run `stream_step` to the end with a wall clock that never moves, a sleep that returns at
    once (recording the delay) and a monotonic clock that only the sleeps advance, so tests see
    the backoff and its bounds without waiting them out."""
    run = StepRun()

    async def on_retry(info: RetryInfo) -> None:
        run.log.append(info)

    async def no_sleep(delay_s: float) -> None:
        run.sleeps_s.append(delay_s)

    def slept_s() -> float:
        return float(sum(run.sleeps_s))

    try:
        async for event in stream_step(
            provider,
            request,
            on_retry=on_retry,
            sleep=no_sleep,
            now=fixed_now,
            startup_timeout_s=startup_timeout_s,
            silence_timeout_s=silence_timeout_s,
            max_attempts=max_attempts,
            max_retry_after_s=max_retry_after_s,
            max_retry_total_s=max_retry_total_s,
            monotonic=slept_s,
        ):
            run.log.append(event)
    except ProviderError as exc:
        run.error = exc
    return run
