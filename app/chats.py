"""The chat state machine as driven by users: create, send, interrupt, edit, queue operations,
archive. Each operation is one transaction that first locks the chat row and raises a typed
error (NotFound, InvalidTransition, QueueFull, ValidationFailed) for what it does not allow,
changing nothing. The worker's side of the machine (acquire, step, finish) is in runs.py.

States (docs/architecture.md, "Chat states"): waiting (the user's turn), pending (needs a
replica), running (owned by worker_id), error (failed; a new user message makes it pending
again)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from app.db import Conn, project_queries, transaction
from app.errors import InvalidTransition, LimitReached, NotFound, QueueFull, ValidationFailed
from app.usage import check_spend_limit

# A check that runs first in the transaction of a write, on its connection; raising aborts the
# write. Sub-agent tools pass the parent run's fence (app/subagents.py), so that a run which
# lost its chat writes nothing for it.
Fence = Callable[[Conn], Awaitable[None]]

Q = project_queries()

ChatStatus = Literal["waiting", "pending", "running", "error"]
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

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> Chat:
        last_error = row["last_error"]
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


async def _lock_chat(conn: Conn, owner: Owner, chat_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(Q.sql("chats_lock_for_owner"), chat_id, owner.user_id)
    if row is None:
        raise NotFound("chat not found")
    return row


async def _lock_unarchived_chat(
    conn: Conn, owner: Owner, chat_id: uuid.UUID, transition: str
) -> asyncpg.Record:
    """Lock the chat for a transition that starts a turn; archived chats refuse those."""
    row = await _lock_chat(conn, owner, chat_id)
    if row["archived"]:
        raise InvalidTransition(
            transition=transition,
            from_status=row["status"],
            reason="the chat is archived; unarchive it first",
        )
    return row


async def _check_user_limits(
    conn: Conn, user_id: uuid.UUID, limits: UserLimits, *, new_chat: bool, new_pending: bool
) -> None:
    """Before a transition adds a chat (not archived) and/or a pending chat for the user: raise
    LimitReached if the user is at a limit. Called before anything is written; the user row
    lock serializes the checks of one user (sql/queries/chats.sql, chats_lock_user_for_limits)."""
    check_chats = new_chat and limits.max_chats is not None
    check_pending = new_pending and limits.max_pending_chats is not None
    if not (check_chats or check_pending):
        return
    await conn.execute(Q.sql("chats_lock_user_for_limits"), user_id)
    counts = await conn.fetchrow(Q.sql("chats_count_of_user"), user_id)
    assert counts is not None
    if check_chats and limits.max_chats is not None and counts["chats"] >= limits.max_chats:
        raise LimitReached(
            limit="chats_per_user",
            maximum=limits.max_chats,
            message=f"you have {counts['chats']} chats, the most allowed: archive some first",
        )
    if (
        check_pending
        and limits.max_pending_chats is not None
        and counts["pending"] >= limits.max_pending_chats
    ):
        raise LimitReached(
            limit="pending_chats_per_user",
            maximum=limits.max_pending_chats,
            message=f"you have {counts['pending']} chats waiting for an answer, the most"
            " allowed: wait for some to start, or stop them",
        )


async def _resolve_model_config(conn: Conn, model_config_id: uuid.UUID | None) -> uuid.UUID:
    if model_config_id is not None:
        row = await conn.fetchrow(Q.sql("chats_enabled_model_config"), model_config_id)
        if row is None:
            raise ValidationFailed(
                "unknown or disabled model config",
                validations=[{"field": "model_config_id", "detail": "not found or disabled"}],
            )
    else:
        row = await conn.fetchrow(Q.sql("chats_default_model_config"))
        if row is None:
            raise ValidationFailed("no default model config is enabled")
    model_id: uuid.UUID = row["id"]
    return model_id


async def create_chat(
    pool: asyncpg.Pool,
    owner: Owner,
    content: object,
    *,
    title: str | None = None,
    model_config_id: uuid.UUID | None = None,
    client_type: str = "api",
    parent_chat_id: uuid.UUID | None = None,
    fence: Fence | None = None,
    limits: UserLimits = NO_LIMITS,
) -> tuple[Chat, Message]:
    """Insert a pending chat and its first user message in one transaction."""
    parts = normalize_user_content(content)
    if title is not None and len(title) > MAX_TITLE_CHARS:
        raise ValidationFailed(
            f"title is longer than {MAX_TITLE_CHARS} characters",
            validations=[{"field": "title", "detail": "too long"}],
        )
    if client_type not in ("ui", "api"):
        raise ValidationFailed(
            "client_type must be ui or api",
            validations=[{"field": "client_type", "detail": "expected ui or api"}],
        )
    async with transaction(pool) as conn:
        if fence is not None:
            await fence(conn)
        await check_spend_limit(conn, organization_id=owner.organization_id, user_id=owner.user_id)
        root_chat_id: uuid.UUID | None = None
        if parent_chat_id is not None:
            parent = await _lock_chat(conn, owner, parent_chat_id)
            root_chat_id = parent["root_chat_id"] or parent["id"]
            client_type = parent["client_type"]  # children inherit their parent's
            if model_config_id is None:  # and its model, unless told otherwise
                model_config_id = parent["model_config_id"]
        config_id = await _resolve_model_config(conn, model_config_id)
        await _check_user_limits(conn, owner.user_id, limits, new_chat=True, new_pending=True)
        chat_row = await conn.fetchrow(
            Q.sql("chats_insert"),
            owner.user_id,
            owner.organization_id,
            parent_chat_id,
            root_chat_id,
            title if title is not None else default_title(parts),
            config_id,
            client_type,
        )
        assert chat_row is not None
        message_row = await conn.fetchrow(
            Q.sql("chats_insert_message"), chat_row["id"], "user", json.dumps(parts)
        )
        assert message_row is not None
    return Chat.from_record(chat_row), Message.from_record(message_row)


async def send_message(
    pool: asyncpg.Pool,
    owner: Owner,
    chat_id: uuid.UUID,
    content: object,
    *,
    queue_limit: int,
    fence: Fence | None = None,
    limits: UserLimits = NO_LIMITS,
) -> SendResult:
    """waiting/error -> pending with the new message; pending/running -> queued (bounded).

    An idle chat may still have queued messages (a Stop leaves the queue as it was; so does an
    error). Then the new message goes to the tail of that queue and the queue's head is sent
    instead (the chat goes pending, the run then works through the queue in order): messages
    are answered in the order they were sent, and the result is `queued`."""
    parts = normalize_user_content(content)
    async with transaction(pool) as conn:
        if fence is not None:
            await fence(conn)
        chat_row = await _lock_unarchived_chat(conn, owner, chat_id, "send a message to")
        await check_spend_limit(
            conn, organization_id=chat_row["organization_id"], user_id=owner.user_id
        )
        if chat_row["status"] in ("waiting", "error"):
            await _check_user_limits(conn, owner.user_id, limits, new_chat=False, new_pending=True)
            head = await conn.fetchrow(Q.sql("chats_pop_queue_head"), chat_id)
            sent = head["content"] if head is not None else json.dumps(parts)
            message_row = await conn.fetchrow(Q.sql("chats_insert_message"), chat_id, "user", sent)
            assert message_row is not None
            queued_row = None
            if head is not None:
                queued_row = await conn.fetchrow(
                    Q.sql("chats_insert_queued"), chat_id, json.dumps(parts)
                )
                assert queued_row is not None
            pending_row = await conn.fetchrow(Q.sql("chats_make_pending"), chat_id)
            assert pending_row is not None
            if queued_row is not None:
                return SendResult(
                    Chat.from_record(pending_row), queued=QueuedMessage.from_record(queued_row)
                )
            return SendResult(
                Chat.from_record(pending_row), message=Message.from_record(message_row)
            )
        queued_count = await conn.fetchval(Q.sql("chats_count_queued"), chat_id)
        if queued_count >= queue_limit:
            raise QueueFull(limit=queue_limit)
        queued_row = await conn.fetchrow(Q.sql("chats_insert_queued"), chat_id, json.dumps(parts))
        assert queued_row is not None
        return SendResult(Chat.from_record(chat_row), queued=QueuedMessage.from_record(queued_row))


async def interrupt(pool: asyncpg.Pool, owner: Owner, chat_id: uuid.UUID) -> Chat:
    """Stop. pending -> waiting at once; running -> marked, the worker completes it; idle chats
    are left as they are (Stop is idempotent)."""
    async with transaction(pool) as conn:
        chat_row = await _lock_chat(conn, owner, chat_id)
        updated: asyncpg.Record | None = chat_row
        # Stop reaches the chat's sub-agents too (they work for the turn being stopped).
        await conn.execute(Q.sql("chats_interrupt_children"), chat_id)
        if chat_row["status"] == "pending":
            updated = await conn.fetchrow(Q.sql("chats_interrupt_pending"), chat_id)
        elif chat_row["status"] == "running":
            updated = await conn.fetchrow(Q.sql("chats_request_interrupt"), chat_id)
        assert updated is not None
        return Chat.from_record(updated)


async def edit_message(
    pool: asyncpg.Pool,
    owner: Owner,
    chat_id: uuid.UUID,
    message_id: int,
    content: object,
    *,
    limits: UserLimits = NO_LIMITS,
) -> Message:
    """Replace a user message: it and everything after it are soft-deleted, the new text is
    inserted, the queue is cleared, and the chat starts over (pending)."""
    parts = normalize_user_content(content)
    async with transaction(pool) as conn:
        chat_row = await _lock_unarchived_chat(conn, owner, chat_id, "edit a message of")
        message_row = await conn.fetchrow(
            Q.sql("chats_get_user_message_for_edit"), message_id, chat_id
        )
        if message_row is None:
            raise NotFound("message not found")
        if message_row["role"] != "user":
            raise InvalidTransition(
                transition="edit a message of",
                from_status=chat_row["status"],
                reason=f"only user messages can be edited, this one is {message_row['role']}",
            )
        await check_spend_limit(
            conn, organization_id=chat_row["organization_id"], user_id=owner.user_id
        )
        await _check_user_limits(
            conn,
            owner.user_id,
            limits,
            new_chat=False,
            new_pending=chat_row["status"] != "pending",
        )
        await conn.execute(Q.sql("chats_soft_delete_messages_from"), chat_id, message_id)
        await conn.execute(Q.sql("chats_uncompress_for_deleted_summaries"), chat_id, message_id)
        await conn.execute(Q.sql("chats_clear_queue"), chat_id)
        await conn.execute(Q.sql("chats_clear_stream_parts"), chat_id)
        new_row = await conn.fetchrow(
            Q.sql("chats_insert_message"), chat_id, "user", json.dumps(parts)
        )
        await conn.fetchrow(Q.sql("chats_reset_to_pending"), chat_id)
        assert new_row is not None
        return Message.from_record(new_row)


async def delete_queued(
    pool: asyncpg.Pool, owner: Owner, chat_id: uuid.UUID, queued_id: int
) -> None:
    async with transaction(pool) as conn:
        await _lock_chat(conn, owner, chat_id)
        if await conn.fetchrow(Q.sql("chats_delete_queued"), queued_id, chat_id) is None:
            raise NotFound("queued message not found")


async def promote_queued(
    pool: asyncpg.Pool,
    owner: Owner,
    chat_id: uuid.UUID,
    queued_id: int,
    *,
    limits: UserLimits = NO_LIMITS,
) -> Message | QueuedMessage:
    """Send a queued message now. On an idle or pending chat it becomes a user message at once.
    On a running chat the run is interrupted and the message goes to the head of the queue; the
    worker sends it as soon as the partial output is saved (so history stays in order). The
    return value says which happened."""
    async with transaction(pool) as conn:
        chat_row = await _lock_chat(conn, owner, chat_id)
        if chat_row["status"] == "running":
            queued_row = await conn.fetchrow(Q.sql("chats_promote_queued"), queued_id, chat_id)
            if queued_row is None:
                raise NotFound("queued message not found")
            await conn.fetchrow(Q.sql("chats_request_interrupt"), chat_id)
            return QueuedMessage.from_record(queued_row)
        makes_pending = chat_row["status"] in ("waiting", "error") and not chat_row["archived"]
        if makes_pending:
            await _check_user_limits(conn, owner.user_id, limits, new_chat=False, new_pending=True)
        queued_row = await conn.fetchrow(Q.sql("chats_delete_queued"), queued_id, chat_id)
        if queued_row is None:
            raise NotFound("queued message not found")
        message_row = await conn.fetchrow(
            Q.sql("chats_insert_message"), chat_id, "user", queued_row["content"]
        )
        assert message_row is not None
        if makes_pending:
            await conn.fetchrow(Q.sql("chats_make_pending"), chat_id)
        return Message.from_record(message_row)


async def update_chat(
    pool: asyncpg.Pool,
    owner: Owner,
    chat_id: uuid.UUID,
    *,
    title: str | None = None,
    archived: bool | None = None,
    fence: Fence | None = None,
    limits: UserLimits = NO_LIMITS,
) -> Chat:
    """PATCH title and/or archived. Archiving a busy chat stops it (-> waiting). Unarchiving
    counts against max_chats_per_user like a new chat (or archive/create/unarchive would get
    around it)."""
    if title is not None and len(title) > MAX_TITLE_CHARS:
        raise ValidationFailed(
            f"title is longer than {MAX_TITLE_CHARS} characters",
            validations=[{"field": "title", "detail": "too long"}],
        )
    async with transaction(pool) as conn:
        if fence is not None:
            await fence(conn)
        current = await _lock_chat(conn, owner, chat_id)
        if archived is False and current["archived"]:
            await _check_user_limits(conn, owner.user_id, limits, new_chat=True, new_pending=False)
        row = await conn.fetchrow(Q.sql("chats_update_fields"), chat_id, title, archived)
        if archived:
            await conn.execute(Q.sql("chats_archive_children"), chat_id)
            await conn.execute(Q.sql("chats_archive_drop_live_parts"), chat_id)
        assert row is not None
        return Chat.from_record(row)


async def get_chat(pool: asyncpg.Pool, owner: Owner, chat_id: uuid.UUID) -> Chat:
    row = await pool.fetchrow(Q.sql("chats_get_for_owner"), chat_id, owner.user_id)
    if row is None:
        raise NotFound("chat not found")
    return Chat.from_record(row)


async def list_chats(
    pool: asyncpg.Pool,
    owner: Owner,
    *,
    status: ChatStatus | None = None,
    archived: bool | None = None,
    limit: int = 50,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[Chat]:
    rows = await pool.fetch(
        Q.sql("chats_list_for_owner"),
        owner.user_id,
        before[0] if before else None,
        status,
        archived,
        before[1] if before else None,
        limit,
    )
    return [Chat.from_record(row) for row in rows]


async def list_messages(
    pool: asyncpg.Pool, owner: Owner, chat_id: uuid.UUID, *, after_id: int = 0, limit: int = 100
) -> tuple[list[Message], list[QueuedMessage]]:
    async with transaction(pool) as conn:
        if await conn.fetchrow(Q.sql("chats_get_for_owner"), chat_id, owner.user_id) is None:
            raise NotFound("chat not found")
        messages = await conn.fetch(Q.sql("chats_list_messages"), chat_id, after_id, limit)
        queued = await conn.fetch(Q.sql("chats_list_queued"), chat_id)
    return (
        [Message.from_record(row) for row in messages],
        [QueuedMessage.from_record(row) for row in queued],
    )
