"""The one streaming interface every provider implements, and the types that cross it.

A provider turns a `ModelRequest` into an async stream of `StreamEvent`s for ONE model step and
knows nothing of chats, databases or retries: the chat loop persists, the retry loop retries.
A provider raises `ProviderError` (with a classified error) for anything that went wrong."""

from __future__ import annotations

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
    """One message of the prompt, content as chatd parts (see DESIGN.md §8 for part shapes)."""

    role: Literal["user", "assistant", "tool"]
    content: list[dict[str, Any]]


@dataclass(frozen=True)
class ModelRequest:
    config: ModelConfig
    messages: list[PromptMessage]
    system: str = ""
    tools: list[ToolSpec] = field(default_factory=list)
    max_output_tokens: int = 4096


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call (providers assemble streamed argument fragments themselves)."""

    id: str
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True)
class StepFinished:
    """The terminal event of a step. A stream that ends without one is a retryable timeout."""

    stop_reason: Literal["end_turn", "tool_use", "max_tokens", "other"]
    usage: Usage


StreamEvent = TextDelta | ReasoningDelta | ToolCall | StepFinished


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

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        """Stream one model step. Must end with exactly one StepFinished."""
        ...
