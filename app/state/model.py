"""The types every room shares: a chat and its owner, messages, queued messages, per-user
limits, and what a user's content may hold. States (docs/architecture.md, "Chat states"):
waiting (the user's turn), pending (needs a replica), running (owned by worker_id),
requires_action (the model called client tools: the chat waits for the client's results, no
replica owns it), error (failed; a new user message makes it pending again)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from app.errors import ValidationFailed

ChatStatus = Literal["waiting", "pending", "running", "requires_action", "error"]


MAX_TEXT_CHARS = 100_000


MAX_PARTS = 50


MAX_TITLE_CHARS = 200


# Content must have a character that is not blank. The blank characters are listed (Python's
# str.isspace() and ECMAScript's \s together) so that the OpenAPI document can carry the very
# same pattern (app/http/models.py) and a client's validator agrees with the server.
NON_BLANK_PATTERN = (
    r"[^\t\n\u000b\u000c\r\u001c-\u001f \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029"
    r"\u202f\u205f\u3000\ufeff]"
)


NON_BLANK = re.compile(NON_BLANK_PATTERN)


@dataclass(frozen=True)
class Owner:
    """The user on whose behalf an operation runs."""

    user_id: uuid.UUID
    organization_id: uuid.UUID


@dataclass(frozen=True)
class UserLimits:
    """Per-user limits enforced on the transitions users drive (app.config.Settings,
    max_chats_per_user and max_pending_chats_per_user); None: no limit. Reaching one raises
    LimitReached (429) and changes nothing. The running limit is enforced by acquire."""

    max_chats: int | None = None  # chats that are not archived
    max_pending_chats: int | None = None  # chats waiting for a replica


NO_LIMITS = UserLimits()


@dataclass(frozen=True)
class Chat:
    id: uuid.UUID
    owner_id: uuid.UUID
    organization_id: uuid.UUID
    parent_chat_id: uuid.UUID | None
    root_chat_id: uuid.UUID | None
    title: str
    status: ChatStatus
    version: int
    generation: int
    worker_id: uuid.UUID | None
    interrupt_requested: bool
    model_config_id: uuid.UUID | None
    client_type: str
    last_error: dict[str, Any] | None
    archived: bool
    created_at: datetime
    updated_at: datetime
    # While requires_action: the client tool calls waiting for results ([{id, name, args}]) and
    # when the replicas stop waiting for them (docs/requires_action.md).
    pending_tool_calls: list[dict[str, Any]] | None = None
    action_deadline_at: datetime | None = None

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> Chat:
        last_error = row["last_error"]
        pending = row["pending_tool_calls"]
        return cls(
            id=row["id"],
            owner_id=row["owner_id"],
            organization_id=row["organization_id"],
            parent_chat_id=row["parent_chat_id"],
            root_chat_id=row["root_chat_id"],
            title=row["title"],
            status=row["status"],
            version=row["version"],
            generation=row["generation"],
            worker_id=row["worker_id"],
            interrupt_requested=row["interrupt_requested_at"] is not None,
            model_config_id=row["model_config_id"],
            client_type=row["client_type"],
            last_error=json.loads(last_error) if last_error is not None else None,
            archived=row["archived"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            pending_tool_calls=json.loads(pending) if pending is not None else None,
            action_deadline_at=row["action_deadline_at"],
        )

    def to_json(self) -> dict[str, Any]:
        """The public Chat shape (docs/api.md, "Routes")."""
        return {
            "id": str(self.id),
            "owner_id": str(self.owner_id),
            "parent_chat_id": str(self.parent_chat_id) if self.parent_chat_id else None,
            "title": self.title,
            "status": self.status,
            "version": self.version,
            "model_config_id": str(self.model_config_id) if self.model_config_id else None,
            "client_type": self.client_type,
            "last_error": self.last_error,
            "archived": self.archived,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "pending_tool_calls": self.pending_tool_calls,
            "action_deadline_at": (
                self.action_deadline_at.isoformat() if self.action_deadline_at else None
            ),
        }


@dataclass(frozen=True)
class Message:
    id: int
    chat_id: uuid.UUID
    role: str
    content: list[dict[str, Any]]
    created_at: datetime
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_micros: int = 0
    compressed: bool = False

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> Message:
        return cls(
            id=row["id"],
            chat_id=row["chat_id"],
            role=row["role"],
            content=json.loads(row["content"]),
            created_at=row["created_at"],
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            cache_read_tokens=row["cache_read_tokens"],
            cache_write_tokens=row["cache_write_tokens"],
            cost_micros=row["cost_micros"],
            compressed=row["compressed"],
        )

    def to_json(self) -> dict[str, Any]:
        """The public Message shape (docs/api.md, "Routes")."""
        body: dict[str, Any] = {
            "id": self.id,
            "chat_id": str(self.chat_id),
            "role": self.role,
            "content": self.content,
            "created_at": self.created_at.isoformat(),
        }
        # Usage and cost of a model call: on assistant messages, and on compaction records
        # (role system), whose summary the model wrote.
        if self.role == "assistant" or self.cost_micros or self.input_tokens or self.output_tokens:
            body["usage"] = {
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "cache_read_tokens": self.cache_read_tokens,
                "cache_write_tokens": self.cache_write_tokens,
            }
            body["cost_micros"] = self.cost_micros
        return body


@dataclass(frozen=True)
class QueuedMessage:
    id: int
    chat_id: uuid.UUID
    content: list[dict[str, Any]]
    promoted: bool
    created_at: datetime

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> QueuedMessage:
        return cls(
            id=row["id"],
            chat_id=row["chat_id"],
            content=json.loads(row["content"]),
            promoted=row["promoted"],
            created_at=row["created_at"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "chat_id": str(self.chat_id),
            "content": self.content,
            "promoted": self.promoted,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class SendResult:
    """Exactly one is set: the message (the chat was idle) or the queued entry (it was busy)."""

    chat: Chat
    message: Message | None = None
    queued: QueuedMessage | None = None


def normalize_user_content(content: object) -> list[dict[str, Any]]:
    """A user's content: a string, or a list of text parts. Anything else is a 400."""
    if isinstance(content, str):
        parts: list[Any] = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise ValidationFailed(
            "content must be a string or a list of parts",
            validations=[{"field": "content", "detail": "expected string or array"}],
        )
    if not parts or len(parts) > MAX_PARTS:
        raise ValidationFailed(
            f"content must have between 1 and {MAX_PARTS} parts",
            validations=[{"field": "content", "detail": "wrong number of parts"}],
        )
    normalized: list[dict[str, Any]] = []
    total_chars = 0
    for index, part in enumerate(parts):
        field = f"content[{index}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValidationFailed(
                "user content parts must be text parts",
                validations=[{"field": field, "detail": 'expected {"type": "text", "text": ...}'}],
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValidationFailed(
                "a text part needs a string text",
                validations=[{"field": f"{field}.text", "detail": "expected string"}],
            )
        if set(part) - {"type", "text"}:
            raise ValidationFailed(
                "unknown fields in a text part",
                validations=[{"field": field, "detail": "only type and text are allowed"}],
            )
        total_chars += len(text)
        normalized.append({"type": "text", "text": text})
    if not any(NON_BLANK.search(p["text"]) for p in normalized):
        raise ValidationFailed(
            "content must not be empty",
            validations=[{"field": "content", "detail": "empty text"}],
        )
    if total_chars > MAX_TEXT_CHARS:
        raise ValidationFailed(
            f"content is longer than {MAX_TEXT_CHARS} characters",
            validations=[{"field": "content", "detail": "too long"}],
        )
    return normalized


def default_title(content: list[dict[str, Any]], max_words: int = 8) -> str:
    """The fallback title: the first words of the first message."""
    words = " ".join(str(p.get("text", "")) for p in content).split()
    title = " ".join(words[:max_words])
    return title[:MAX_TITLE_CHARS]
