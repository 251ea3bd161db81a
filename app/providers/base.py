"""The one streaming interface every provider implements, and the types that cross it.

A provider turns a `ModelRequest` into an async stream of `StreamEvent`s for ONE model step and
knows nothing of chats, databases or retries: the chat loop persists, the retry loop retries.
A provider raises `ProviderError` (with a classified error) for anything that went wrong."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

ErrorKind = Literal[
    "overloaded",
    "rate_limit",
    "timeout",
    "startup_timeout",
    "auth",
    "config",
    "usage_limit",
    "generic",
]


@dataclass(frozen=True)
class ModelConfig:
    id: str
    provider: str  # "anthropic" | "openai" | "builtin"
    model: str
    display_name: str = ""
    context_limit: int = 200_000
    compression_threshold: int = 70  # percent of context_limit
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class PromptMessage:
    """One message of the prompt, content as chatd parts (part shapes: docs/api.md, "Routes")."""

    role: Literal["user", "assistant", "tool"]
    content: list[dict[str, Any]]


class UsageMeter:
    """Where a provider reports the usage of the attempt in progress as soon as it knows it
    (Anthropic: message_start, then every message_delta), so that the spend of an attempt that
    never reaches StepFinished (interrupted, failed, retried) can still be recorded. Each report
    replaces the last (the counts are cumulative per attempt); the run `take()`s it."""

    def __init__(self) -> None:
        self._usage: Usage | None = None

    def report(self, usage: Usage) -> None:
        self._usage = usage

    def take(self) -> Usage | None:
        """The usage reported since the last take (None if nothing was), and forget it."""
        usage, self._usage = self._usage, None
        return usage


@dataclass(frozen=True)
class ModelRequest:
    config: ModelConfig
    messages: list[PromptMessage]
    system: str = ""
    tools: list[ToolSpec] = field(default_factory=list)
    max_output_tokens: int = 4096
    # Optional: where the adapter reports usage before the step ends (see UsageMeter).
    meter: UsageMeter | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of the model's visible reasoning.

    `signature` is Anthropic's integrity token for a thinking block; it arrives as its own delta
    (with empty text) at the end of the block. A reasoning part replayed to Anthropic must carry
    it back (`{"type": "reasoning", "text", "signature"}`), or the API rejects the block, so the
    chat loop should keep it on the persisted part. Other providers leave it empty."""

    text: str
    signature: str = ""


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call (providers assemble streamed argument fragments themselves)."""

    id: str
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Usage:
    """Token counts of one step. `input_tokens` excludes the cached prompt tokens, which are
    counted (and priced) separately, as Anthropic reports them; OpenAI adapters subtract."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def context_tokens(self) -> int:
        """Everything the model read or wrote this step: what compaction compares to its limit."""
        return (
            self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
            + self.output_tokens
        )


@dataclass(frozen=True)
class StepFinished:
    """The terminal event of a step. A stream that ends without one is a retryable timeout."""

    stop_reason: Literal["end_turn", "tool_use", "max_tokens", "other"]
    usage: Usage


StreamEvent = TextDelta | ReasoningDelta | ToolCall | StepFinished


@dataclass(frozen=True)
class StreamProgress:
    """The provider received something that is not (yet) a chatd event: a fragment of tool-call
    arguments, a message header, a block boundary. Only the stream guards look at it (retry.py),
    so a model that spends a minute writing one large tool call is not mistaken for a silent
    stream; `retry.stream_step` never passes it on."""


ProviderEvent = StreamEvent | StreamProgress


@dataclass(frozen=True)
class ClassifiedError:
    kind: ErrorKind
    provider: str
    retryable: bool
    message: str
    status_code: int | None = None
    retry_after_s: float | None = None
    detail: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "provider": self.provider,
            "retryable": self.retryable,
            "message": self.message,
            "status_code": self.status_code,
            "retry_after_s": self.retry_after_s,
            "detail": self.detail,
        }


class ProviderError(Exception):
    def __init__(self, error: ClassifiedError) -> None:
        super().__init__(error.message)
        self.error = error


class Provider(Protocol):
    name: str

    def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        """Stream one model step. Must end with exactly one StepFinished. May interleave
        StreamProgress events; callers go through `retry.stream_step`, which drops them."""
        ...


def parse_tool_arguments(raw: str) -> dict[str, Any]:
    """Tool-call arguments as a dict, from the JSON text a model streamed.

    Models occasionally emit invalid JSON (or are cut off by max_tokens). Failing the step would
    retry the same answer; handing the raw text to the tool lets its validation error reach the
    model, which then corrects itself, so that is what this does."""
    if not raw.strip():
        return {}
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        return {"_invalid_json": raw}
    return value if isinstance(value, dict) else {"input": value}


def tool_result_text(result: object) -> str:
    """A tool result as the text a model reads: a string as it is, anything else as JSON."""
    if isinstance(result, str):
        return result
    return json.dumps(result, ensure_ascii=False, default=str)
