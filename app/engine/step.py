"""One model step: the seam a run calls its provider through, and what a step produced.

`stream_once` is the default seam: one attempt. The retry loop (`app.providers.retry.
stream_step`) has the same signature and is what the service plugs in. When it retries, it calls
`on_retry` first; the run voids the step's live parts and writes one `{"type": "retry", ...}`
control part (role "system") so streams emit a `retry` event. `StepOutput` accumulates a step's
deltas and tool calls into the record the run persists; `step_cost_micros` prices it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from app.log import get_logger
from app.providers.base import (
    ClassifiedError,
    ModelConfig,
    ModelRequest,
    Provider,
    ProviderError,
    StepFinished,
    StreamEvent,
    StreamProgress,
    TextDelta,
    ToolCall,
    Usage,
    UsageMeter,
)
from app.providers.pricing import cost_micros
from app.providers.retry import RetryInfo
from app.state.runs import StepRecord
from app.text import storable

log = get_logger(__name__)

# The synthetic result of a tool call that an interrupt cut off (docs/architecture.md,
# "Chat states").
INTERRUPTED_RESULT = "interrupted"


class StepStreamer(Protocol):
    """The signature of the seam, shared with the retry loop `app.providers.retry.stream_step`
    (which the service may pass as `RunDeps.stream_step`)."""

    def __call__(
        self,
        provider: Provider,
        request: ModelRequest,
        *,
        on_retry: Callable[[RetryInfo], Awaitable[None]],
    ) -> AsyncIterator[StreamEvent]: ...


async def stream_once(
    provider: Provider,
    request: ModelRequest,
    *,
    on_retry: Callable[[RetryInfo], Awaitable[None]],
) -> AsyncIterator[StreamEvent]:
    """Stream one model step: the one place a run calls its provider.

    This default makes one attempt: a `ProviderError` ends the step (and the run marks the chat
    `error`), and so does a stream that ends before its terminal event (a retryable timeout
    that is not retried here). The retry loop (`app.providers.retry.stream_step`) has the same
    signature and contract: it awaits `on_retry(info)` before each new attempt (the run then
    voids the failed attempt's live parts and writes a `retry` control part) and raises
    `ProviderError` when the error is terminal or the retries are exhausted."""
    del on_retry
    finished = False
    async for event in provider.stream(request):
        if isinstance(event, StreamProgress):
            continue
        yield event
        if isinstance(event, StepFinished):
            finished = True
            break
    if not finished:
        raise ProviderError(
            ClassifiedError(
                kind="timeout",
                provider=provider.name,
                retryable=True,
                message="the model's stream ended before its final event",
            )
        )


def step_cost_micros(config: ModelConfig, usage: Usage) -> int:
    try:
        return cost_micros(usage, config.options)
    except ValueError as exc:  # the model-config API validates prices; never fail a run on it
        log.warning("run.bad_price", model_config_id=config.id, error=str(exc))
        return 0


@dataclass
class StepOutput:
    """What a step has produced so far, in the persisted shape: consecutive text (reasoning)
    deltas merged into one part, tool calls in the order they came."""

    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    # The calls of client-side tools: not run here, their results come from the chat's client
    # (docs/requires_action.md). A subset of tool_calls, without results in tool_results.
    client_calls: list[ToolCall] = field(default_factory=list)
    finished: StepFinished | None = None
    # The usage the provider reported for the attempt in progress, before its StepFinished.
    meter: UsageMeter = field(default_factory=UsageMeter)
    # The parts (see `content`); the text of `_open_part`, the last one, is `_open_chunks`
    # joined: one append per delta, joined once when read (adding each delta to the text
    # copies the whole text every time, quadratic in a long answer).
    _content: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _open_part: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    _open_chunks: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def content(self) -> list[dict[str, Any]]:
        """The step's parts so far, complete (the list itself: `clear()` voids them)."""
        self._close_open_part()
        return self._content

    def add_delta(self, kind: Literal["text", "reasoning"], text: str, signature: str = "") -> None:
        content = self._content
        part = self._open_part
        if part is not None and content and content[-1] is part and part["type"] == kind:
            self._open_chunks.append(text)
        else:
            self._close_open_part()
            if content and content[-1]["type"] == kind:
                part = content[-1]
                self._open_chunks = [part["text"], text]
            else:
                part = {"type": kind, "text": text}
                content.append(part)
                self._open_chunks = [text]
            self._open_part = part
        if signature:
            # Anthropic's thinking-block signature must travel with the persisted part.
            part["signature"] = signature

    def _close_open_part(self) -> None:
        part = self._open_part
        if part is not None:
            part["text"] = "".join(self._open_chunks)
            self._open_part = None
            self._open_chunks = []

    def add_tool_call(self, call: ToolCall) -> dict[str, Any]:
        self.tool_calls.append(call)
        part = {"type": "tool_call", "id": call.id, "name": call.name, "args": call.args}
        self.content.append(part)  # `content`: closes the text part before it
        return part

    def record(self, config: ModelConfig, *, interrupted: bool = False) -> StepRecord:
        results = list(self.tool_results)
        if interrupted:
            answered = {r["tool_call_id"] for r in results}
            results += [
                tool_result_part(call, INTERRUPTED_RESULT, is_error=True)
                for call in self.tool_calls
                if call.id not in answered
            ]
        # A step cut short carries whatever usage the provider had reported (e.g. the input
        # tokens of Anthropic's message_start): it was spent all the same.
        finished = self.finished
        usage = finished.usage if finished is not None else (self.meter.take() or Usage())
        return StepRecord(
            assistant_content=list(self.content),
            tool_results=results,
            usage=usage,
            cost_micros=step_cost_micros(config, usage),
        )


def tool_result_part(call: ToolCall, result: Any, *, is_error: bool) -> dict[str, Any]:
    return {
        "type": "tool_result",
        "tool_call_id": call.id,
        "name": call.name,
        "result": result,
        "is_error": is_error,
    }


async def collect_text(events: AsyncIterator[StreamEvent]) -> tuple[str, Usage]:
    """The text and usage of a step that is read whole, not streamed to users (a summary, a
    title). Tool calls, if a model made any, are ignored."""
    chunks: list[str] = []
    usage = Usage()
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                chunks.append(storable(event.text))
            elif isinstance(event, StepFinished):
                usage = event.usage
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    return "".join(chunks), usage
