"""OpenAI through the official SDK: Chat Completions, streamed.

Why Chat Completions and not the Responses API (docs/providers.md has the long form): chatd owns
the conversation state (every step is persisted and replayed as a prompt), so the Responses
API's server-side state buys nothing; Chat Completions is the format every OpenAI-compatible
server behind OPENAI_BASE_URL speaks (vLLM, Ollama, LiteLLM, OpenRouter, Azure); and its stream
is small: text deltas, tool-call deltas keyed by index, a finish_reason chunk and a usage chunk.

The terminal event is the finish_reason chunk followed by the usage chunk
(`stream_options.include_usage`); a stream that ends without them is a retryable `timeout`. For
servers that never send usage, `options.stream_usage: false` makes finish_reason alone terminal.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import httpx2
import openai
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
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

PROVIDER = "openai"

_StopReason = Literal["end_turn", "tool_use", "max_tokens", "other"]
_FINISH_REASONS: dict[str, _StopReason] = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "length": "max_tokens",
}


class OpenAIProvider:
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
        self._client = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, http_client=http_client
        )
        self._now = now

    async def aclose(self) -> None:
        await self._client.close()

    async def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        messages = build_messages(request)
        tools: list[ChatCompletionFunctionToolParam] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.input_schema,
                },
            }
            for t in request.tools
        ]
        wants_usage = request.config.options.get("stream_usage", True) is not False
        step = _StepState()
        try:
            chunks = await self._client.chat.completions.create(
                model=request.config.model,
                messages=messages,
                max_completion_tokens=request.max_output_tokens,
                tools=tools or openai.omit,
                stream=True,
                stream_options={"include_usage": True} if wants_usage else openai.omit,
            )
            async with chunks:
                async for chunk in chunks:
                    for out in step.apply(chunk):
                        yield out
                    if request.meter is not None and chunk.usage is not None and step.usage:
                        request.meter.report(step.usage)  # OpenAI reports usage at the end only
        except Exception as exc:  # CancelledError is a BaseException: a cancel passes untouched
            raise ProviderError(classify(exc, PROVIDER, now=self._now)) from exc
        if step.finish_reason is None or (wants_usage and step.usage is None):
            missing = "finish_reason" if step.finish_reason is None else "the usage chunk"
            raise ProviderError(
                ClassifiedError(
                    kind="timeout",
                    provider=PROVIDER,
                    retryable=True,
                    message=f"the provider's stream ended before {missing}",
                )
            )
        yield StepFinished(step.stop_reason(), step.usage or Usage())


@dataclass
class _ToolCallDraft:
    id: str = ""
    name: str = ""
    argument_fragments: list[str] = field(default_factory=list)


@dataclass
class _StepState:
    tool_calls: dict[int, _ToolCallDraft] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage | None = None

    def apply(self, chunk: ChatCompletionChunk) -> list[ProviderEvent]:
        out: list[ProviderEvent] = []
        if chunk.usage is not None:
            details = chunk.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details is not None else 0
            self.usage = Usage(
                input_tokens=max(0, chunk.usage.prompt_tokens - cached),
                output_tokens=chunk.usage.completion_tokens,
                cache_read_tokens=cached,
            )
        for choice in chunk.choices:
            if choice.index != 0:  # we never ask for n > 1
                continue
            delta = choice.delta
            # Not in OpenAI's schema, but what DeepSeek, vLLM and others stream reasoning as.
            reasoning = getattr(delta, "reasoning_content", None)
            if isinstance(reasoning, str) and reasoning:
                out.append(ReasoningDelta(reasoning))
            if delta.content:
                out.append(TextDelta(delta.content))
            if delta.refusal:
                out.append(TextDelta(delta.refusal))
            for call in delta.tool_calls or ():
                draft = self.tool_calls.setdefault(call.index, _ToolCallDraft())
                # The id and name arrive on the first fragment of a call, arguments on any.
                draft.id = call.id or draft.id
                if call.function is not None:
                    draft.name = call.function.name or draft.name
                    if call.function.arguments:
                        draft.argument_fragments.append(call.function.arguments)
            if choice.finish_reason is not None and self.finish_reason is None:
                self.finish_reason = choice.finish_reason
                # Tool calls are complete only now: fragments of any index may come until here.
                out.extend(
                    ToolCall(
                        # Some compatible servers send no id; the tool result needs one to cite.
                        id=draft.id or f"call_{uuid.uuid4().hex[:24]}",
                        name=draft.name,
                        args=parse_tool_arguments("".join(draft.argument_fragments)),
                    )
                    for _, draft in sorted(self.tool_calls.items())
                )
        return out or [StreamProgress()]

    def stop_reason(self) -> _StopReason:
        # Some compatible servers say "stop" after tool calls; the calls are what matter.
        if self.tool_calls:
            return "tool_use"
        return _FINISH_REASONS.get(self.finish_reason or "", "other")


def build_messages(request: ModelRequest) -> list[ChatCompletionMessageParam]:
    """The prompt in Chat Completions shapes: tool results become one `tool` message each."""
    messages: list[ChatCompletionMessageParam] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    for message in request.messages:
        messages.extend(_messages(message))
    return messages


def _messages(message: PromptMessage) -> list[ChatCompletionMessageParam]:
    texts = [str(p.get("text", "")) for p in message.content if p.get("type") == "text"]
    text = "".join(texts)
    out: list[ChatCompletionMessageParam] = []
    # Tool results answer the previous assistant turn, so they come before any text.
    for part in message.content:
        if part.get("type") == "tool_result":
            content = tool_result_text(part.get("result"))
            if part.get("is_error"):
                # Chat Completions has no error flag on tool results: say it in the content.
                content = f"Error: {content}"
            out.append(
                {"role": "tool", "tool_call_id": str(part["tool_call_id"]), "content": content}
            )
    if message.role == "assistant":
        calls: list[ChatCompletionMessageFunctionToolCallParam] = [
            {
                "id": str(part["id"]),
                "type": "function",
                "function": {"name": str(part["name"]), "arguments": _arguments_json(part)},
            }
            for part in message.content
            if part.get("type") == "tool_call"
        ]
        if text or calls:
            assistant: ChatCompletionAssistantMessageParam = {
                "role": "assistant",
                "content": text or None,
            }
            if calls:
                assistant["tool_calls"] = calls
            out.append(assistant)
    elif text:
        out.append({"role": "user", "content": text})
    return out


def _arguments_json(part: dict[str, Any]) -> str:
    args = part.get("args")
    return json.dumps(args if isinstance(args, dict) else {}, ensure_ascii=False)
