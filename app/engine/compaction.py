"""Compaction: when a chat's context reaches its model's threshold (default 70 % of the context
limit), older messages are summarized by the model, marked `compressed` (kept for the user's
history, left out of prompts), and a summary message takes their place at the start of every
later prompt. The summary message is a visible record: role `system`, one part
`{"type": "compaction", "summary", "compressed_message_ids": [first, last], "compressed_count"}`.

What is summarized: every non-compressed message before the current turn (the last user
message and what follows it stay verbatim, so the model still sees the question it answers)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.providers.base import ModelConfig, ModelRequest, PromptMessage

SUMMARY_SYSTEM_PROMPT = (
    "You compress conversations. Summarize the conversation below so that an assistant can "
    "continue it without the original: keep facts, decisions, open questions, names, numbers "
    "and the results of tool calls. Write plain prose, at most a few paragraphs."
)
SUMMARY_MAX_OUTPUT_TOKENS = 1024


@dataclass(frozen=True)
class HistoryMessage:
    """A persisted message as the prompt builder and compaction see it."""

    id: int
    role: str
    content: list[dict[str, Any]]
    input_tokens: int = 0
    output_tokens: int = 0


def estimate_tokens(messages: list[HistoryMessage]) -> int:
    """Context size of a prompt made of these messages. The provider's own count of the last
    step (its input plus output tokens) is exact for everything up to it; the rest is estimated
    at about four characters per token."""
    last_counted = None
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == "assistant" and messages[index].input_tokens:
            last_counted = index
            break
    if last_counted is None:
        return _estimate(messages)
    counted = messages[last_counted]
    return counted.input_tokens + counted.output_tokens + _estimate(messages[last_counted + 1 :])


def _estimate(messages: list[HistoryMessage]) -> int:
    return sum(len(json.dumps(m.content)) for m in messages) // 4


def needs_compaction(config: ModelConfig, messages: list[HistoryMessage]) -> bool:
    threshold = config.context_limit * config.compression_threshold / 100
    return estimate_tokens(messages) >= threshold and bool(messages_to_compact(messages))


def messages_to_compact(messages: list[HistoryMessage]) -> list[HistoryMessage]:
    """Everything before the current turn's user message, `messages` being in id order.

    The summary of an earlier compaction is included (a new summary folds the old one in) and
    comes first: it was inserted during the turn it was made in, so by id it sits after that
    turn's user message, while what it summarizes came before everything else."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        return []
    before = messages[:last_user]
    return [m for m in before if is_summary(m)] + [m for m in before if not is_summary(m)]


def summary_text(content: list[dict[str, Any]]) -> str | None:
    """The summary a message's content carries, or None when it is not a compaction record."""
    for part in content:
        if part.get("type") == "compaction":
            return str(part.get("summary", ""))
    return None


def is_summary(message: HistoryMessage) -> bool:
    return message.role == "system" and summary_text(message.content) is not None


def summary_request(config: ModelConfig, to_compact: list[HistoryMessage]) -> ModelRequest:
    transcript = "\n\n".join(_render(m) for m in to_compact)
    return ModelRequest(
        config=config,
        system=SUMMARY_SYSTEM_PROMPT,
        messages=[PromptMessage(role="user", content=[{"type": "text", "text": transcript}])],
        max_output_tokens=SUMMARY_MAX_OUTPUT_TOKENS,
    )


def summary_part(summary: str, compacted: list[HistoryMessage]) -> dict[str, Any]:
    """The content part of the summary message. `compressed_message_ids` is the id range
    [first, last] it covers: every visible message in it was compressed by this summary (an edit
    that deletes the summary un-compresses that range again, see chats.edit_message)."""
    ids = [m.id for m in compacted]
    return {
        "type": "compaction",
        "summary": summary,
        "compressed_message_ids": [min(ids), max(ids)],
        "compressed_count": len(compacted),
    }


def _render(message: HistoryMessage) -> str:
    lines = []
    for part in message.content:
        kind = part.get("type")
        if kind == "text":
            lines.append(str(part.get("text", "")))
        elif kind == "compaction":
            lines.append(f"(summary of earlier conversation) {part.get('summary', '')}")
        elif kind == "tool_call":
            lines.append(f"(called tool {part.get('name')} with {json.dumps(part.get('args'))})")
        elif kind == "tool_result":
            lines.append(f"(tool {part.get('name')} returned {json.dumps(part.get('result'))})")
    return f"{message.role}: " + " ".join(lines)
