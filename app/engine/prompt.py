"""What a run sends the model: the request built from the chat's history (the compaction
summary first, then the messages it did not cover), and small readers of that history (the
first question, for titles; the text of a message)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.engine import compaction
from app.providers.base import (
    ModelConfig,
    ModelRequest,
    PromptMessage,
    ToolSpec,
)
from app.state.model import Message
from app.tools.registry import ToolRegistry

# How the compaction summary opens the system prompt's last section.
SUMMARY_PREAMBLE = (
    "Summary of the earlier part of this conversation (its messages were compacted to save "
    "context; continue from it):"
)


def build_request(
    config: ModelConfig,
    history: list[Message],
    tools: ToolRegistry,
    *,
    for_child: bool = False,
    client_tools: Sequence[ToolSpec] = (),
) -> ModelRequest:
    """The prompt of a step. `history` is the visible, uncompressed history in id order.
    `client_tools`: the chat's client-side tools, offered after the server's (a name the
    server's registry has is left out: the server's tool is the one that runs).

    - The latest compaction summary comes first: it is the last section of the system text, so
      every adapter (Anthropic `system`, OpenAI's system message; the echo model ignores it)
      reads it before all messages. By id it sits after the user message of the turn it was
      made in, which is why it is taken out of the message order.
    - Other `system` messages' text parts are the rest of the system text.
    - user / assistant / tool messages follow in id order.
    - A child chat is offered only the tools meant for children."""
    system: list[str] = []
    summary: str | None = None
    messages: list[PromptMessage] = []
    for message in history:
        if message.role == "system":
            carried = compaction.summary_text(message.content)
            if carried is not None:
                summary = carried  # the latest one wins
                continue
            system.extend(
                str(p.get("text", "")) for p in message.content if p.get("type") == "text"
            )
        elif message.role in ("user", "assistant", "tool"):
            messages.append(PromptMessage(message.role, message.content))  # type: ignore[arg-type]
    if summary is not None:
        system.append(f"{SUMMARY_PREAMBLE}\n\n{summary}")
    return ModelRequest(
        config=config,
        messages=messages,
        system="\n\n".join(system),
        tools=[
            *tools.specs(for_child=for_child),
            *(spec for spec in client_tools if tools.get(spec.name) is None),
        ],
    )


def history_view(history: list[Message]) -> list[compaction.HistoryMessage]:
    """Messages as compaction sees them. Its "input tokens" of a step are the whole prompt the
    provider read: our `input_tokens` exclude cached tokens, which a cached prompt has most of."""
    return [
        compaction.HistoryMessage(
            id=m.id,
            role=m.role,
            content=m.content,
            input_tokens=m.input_tokens + m.cache_read_tokens + m.cache_write_tokens,
            output_tokens=m.output_tokens,
        )
        for m in history
    ]


def first_question(history: list[Message]) -> list[dict[str, Any]] | None:
    """The chat's first user message, when the turn about to run is the one that answers it
    (nothing but system text before it, no later user message, nothing compacted); else None."""
    users = [m for m in history if m.role == "user"]
    if len(users) != 1:
        return None
    if any(m.role == "system" and compaction.summary_text(m.content) is not None for m in history):
        return None
    if any(m.id < users[0].id and m.role != "system" for m in history):
        return None
    return users[0].content


def text_of(content: list[dict[str, Any]]) -> str:
    return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
