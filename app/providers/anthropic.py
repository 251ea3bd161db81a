"""Anthropic through the official SDK: the Messages API, streamed as raw server-sent events.

We read the raw events (`messages.create(stream=True)`) rather than the SDK's `messages.stream`
helper because we map every event ourselves anyway (text, thinking, tool input fragments, usage),
and the raw events make "the stream ended before message_stop" visible, which chatd classifies
as a retryable timeout (docs/providers.md, "Classification"). The SDK's own retries are off
(`max_retries=0`): chatd retries in retry.py, where each retry is published.

Prompt caching: Anthropic caches the prompt prefix up to each `cache_control` breakpoint, in
the order tools → system → messages. We mark the end of the static part (the system prompt,
or the last tool when there is none: one breakpoint there covers both, since tools come first)
and the last block of the last message, so the next step of the tool loop, whose prompt extends
this one, reads everything up to it from the cache.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

import anthropic
import httpx2
from anthropic.types import (
    CacheControlEphemeralParam,
    MessageParam,
    TextBlockParam,
    ThinkingBlockParam,
    ThinkingConfigParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)

from app.providers.base import (
    ClassifiedError,
    ModelRequest,
    PromptMessage,
    ProviderError,
    ProviderEvent,
    ReasoningDelta,
    StepFinished,
    StreamProgress,
    TextDelta,
    ToolCall,
    Usage,
    parse_tool_arguments,
    tool_result_text,
)
from app.providers.classify import classify, utc_now

PROVIDER = "anthropic"
EPHEMERAL: CacheControlEphemeralParam = {"type": "ephemeral"}

_Block = TextBlockParam | ThinkingBlockParam | ToolUseBlockParam | ToolResultBlockParam
_StopReason = Literal["end_turn", "tool_use", "max_tokens", "other"]

_STOP_REASONS: dict[str, _StopReason] = {
    "end_turn": "end_turn",
    "stop_sequence": "end_turn",
    "tool_use": "tool_use",
    "max_tokens": "max_tokens",
    "model_context_window_exceeded": "max_tokens",
}


# Events that carry (cumulative) usage: reported to the request's UsageMeter as they come.
_USAGE_EVENTS = frozenset({"message_start", "message_delta"})


class AnthropicProvider:
    """One SDK client (one connection pool) per API key and base URL; the registry caches it."""

    name = PROVIDER

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        now: Callable[[], datetime] = utc_now,
        http_client: httpx2.AsyncClient | None = None,
    ) -> None:
        """`http_client`: the SDK's own by default; tests pass one with a faulty transport."""
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, max_retries=0, http_client=http_client
        )
        self._now = now

    async def aclose(self) -> None:
        await self._client.close()

    async def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        # Arguments are built before the try: a conversion bug is ours, not the provider's.
        system, messages, tools = build_prompt(request)
        thinking = _thinking_config(request.config.options)
        step = _StepState()
        try:
            events = await self._client.messages.create(
                model=request.config.model,
                max_tokens=request.max_output_tokens,
                messages=messages,
                stream=True,
                system=system or anthropic.omit,
                tools=tools or anthropic.omit,
                thinking=thinking if thinking is not None else anthropic.omit,
            )
            async with events:
                async for event in events:
                    for out in step.apply(event):
                        yield out
                    if request.meter is not None and event.type in _USAGE_EVENTS:
                        request.meter.report(step.finished().usage)
                    if step.stopped:
                        break
        except Exception as exc:  # CancelledError is a BaseException: a cancel passes untouched
            raise ProviderError(classify(exc, PROVIDER, now=self._now)) from exc
        if not step.stopped:
            raise ProviderError(
                ClassifiedError(
                    kind="timeout",
                    provider=PROVIDER,
                    retryable=True,
                    message="the provider's stream ended before message_stop",
                )
            )
        yield step.finished()


@dataclass
class _ToolBlock:
    id: str
    name: str
    json_fragments: list[str] = field(default_factory=list)


@dataclass
class _StepState:
    """What one streamed step has accumulated: open tool blocks, usage, the stop reason."""

    tool_blocks: dict[int, _ToolBlock] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    stop_reason: _StopReason = "other"
    stopped: bool = False

    def apply(self, event: anthropic.types.RawMessageStreamEvent) -> list[ProviderEvent]:  # noqa: PLR0911, PLR0912  one branch per raw event type
        if event.type == "message_start":
            usage = event.message.usage
            self.input_tokens = usage.input_tokens
            self.output_tokens = usage.output_tokens
            self.cache_read_tokens = usage.cache_read_input_tokens or 0
            self.cache_write_tokens = usage.cache_creation_input_tokens or 0
        elif event.type == "content_block_start":
            block = event.content_block
            if block.type == "tool_use":
                self.tool_blocks[event.index] = _ToolBlock(block.id, block.name)
            elif block.type == "text" and block.text:
                return [TextDelta(block.text)]
            elif block.type == "thinking" and block.thinking:
                return [ReasoningDelta(block.thinking)]
        elif event.type == "content_block_delta":
            delta = event.delta
            if delta.type == "text_delta":
                return [TextDelta(delta.text)]
            if delta.type == "thinking_delta":
                return [ReasoningDelta(delta.thinking)]
            if delta.type == "signature_delta":
                return [ReasoningDelta("", signature=delta.signature)]
            if delta.type == "input_json_delta" and event.index in self.tool_blocks:
                self.tool_blocks[event.index].json_fragments.append(delta.partial_json)
        elif event.type == "content_block_stop":
            tool = self.tool_blocks.pop(event.index, None)
            if tool is not None:
                args = parse_tool_arguments("".join(tool.json_fragments))
                return [ToolCall(id=tool.id, name=tool.name, args=args)]
        elif event.type == "message_delta":
            # message_delta usage is cumulative; input counts appear here only on some paths.
            totals = event.usage
            self.output_tokens = totals.output_tokens
            if totals.input_tokens is not None:
                self.input_tokens = totals.input_tokens
            if totals.cache_read_input_tokens is not None:
                self.cache_read_tokens = totals.cache_read_input_tokens
            if totals.cache_creation_input_tokens is not None:
                self.cache_write_tokens = totals.cache_creation_input_tokens
            if event.delta.stop_reason is not None:
                self.stop_reason = _STOP_REASONS.get(event.delta.stop_reason, "other")
        elif event.type == "message_stop":
            self.stopped = True
        return [StreamProgress()]

    def finished(self) -> StepFinished:
        return StepFinished(
            self.stop_reason,
            Usage(
                input_tokens=self.input_tokens,
                output_tokens=self.output_tokens,
                cache_read_tokens=self.cache_read_tokens,
                cache_write_tokens=self.cache_write_tokens,
            ),
        )


def build_prompt(
    request: ModelRequest,
) -> tuple[list[TextBlockParam], list[MessageParam], list[ToolParam]]:
    """The request's system blocks, messages and tools in Anthropic's shapes, with cache marks."""
    tools: list[ToolParam] = [
        {"name": t.name, "description": t.description, "input_schema": t.input_schema}
        for t in request.tools
    ]
    system: list[TextBlockParam] = []
    if request.system:
        system.append({"type": "text", "text": request.system, "cache_control": EPHEMERAL})
    elif tools:
        tools[-1]["cache_control"] = EPHEMERAL

    # Anthropic wants alternating turns and tool results inside a user turn; chatd's "tool"
    # messages become user turns, and adjacent same-role turns are merged into one.
    turns: list[tuple[Literal["user", "assistant"], list[_Block]]] = []
    for message in request.messages:
        role: Literal["user", "assistant"] = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))

    if turns:
        _mark_last_cacheable(turns[-1][1])
    messages: list[MessageParam] = []
    for role, blocks in turns:
        if role == "user":
            messages.append({"role": "user", "content": blocks})
        else:
            messages.append({"role": "assistant", "content": blocks})
    return system, messages, tools


def _blocks(message: PromptMessage) -> list[_Block]:
    blocks: list[_Block] = []
    for part in message.content:
        kind = part.get("type")
        if kind == "text":
            text = str(part.get("text", ""))
            if text:  # the API rejects empty text blocks
                blocks.append({"type": "text", "text": text})
        elif kind == "reasoning" and message.role == "assistant":
            # Only signed thinking can be replayed; unsigned reasoning (another provider's, or
            # an interrupted block) is dropped, which the API allows for earlier turns.
            signature = str(part.get("signature") or "")
            if signature:
                blocks.append(
                    {
                        "type": "thinking",
                        "thinking": str(part.get("text", "")),
                        "signature": signature,
                    }
                )
        elif kind == "tool_call":
            args = part.get("args")
            blocks.append(
                {
                    "type": "tool_use",
                    "id": str(part["id"]),
                    "name": str(part["name"]),
                    "input": args if isinstance(args, dict) else {},
                }
            )
        elif kind == "tool_result":
            blocks.append(
                {
                    "type": "tool_result",
                    "tool_use_id": str(part["tool_call_id"]),
                    "content": tool_result_text(part.get("result")),
                    "is_error": bool(part.get("is_error", False)),
                }
            )
    # Tool results must open their user turn (they answer the previous turn's tool_use).
    blocks.sort(key=lambda block: block["type"] != "tool_result")
    return blocks


def _mark_last_cacheable(blocks: list[_Block]) -> None:
    # Thinking blocks cannot carry cache_control; the block before them marks the same prefix.
    for block in reversed(blocks):
        if block["type"] != "thinking":
            block["cache_control"] = EPHEMERAL
            return


def _thinking_config(options: dict[str, Any]) -> ThinkingConfigParam | None:
    """Extended thinking, opted into per model: `options.thinking` is passed as the API's
    `thinking` object (e.g. {"type": "enabled", "budget_tokens": 4096} or {"type": "adaptive"});
    `options.thinking_budget_tokens` is a shorthand for the first form."""
    raw = options.get("thinking")
    if isinstance(raw, dict):
        return cast(ThinkingConfigParam, raw)  # its shape is the API's to validate
    budget = options.get("thinking_budget_tokens")
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return {"type": "enabled", "budget_tokens": budget}
    return None
