"""The chat state machine as driven by users: create, send, interrupt, edit, queue operations,
archive, and the answer to client tool calls (requires_action -> pending). Each operation is one
transaction that first locks the chat row and raises a typed error (NotFound, InvalidTransition,
QueueFull, ValidationFailed) for what it does not allow, changing nothing. The worker's side of
the machine (acquire, step, finish) is in runs.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime
from typing import Any

import asyncpg

from app.db.queries import Conn, project_queries, transaction
from app.errors import (
    Conflict,
    InvalidTransition,
    LimitReached,
    NotFound,
    QueueFull,
    ValidationFailed,
)
from app.state import mcp_servers
from app.state.client_tools import (
    ARCHIVED_RESULT,
    INTERRUPTED_RESULT,
    answer_parts,
    check_results_shape,
    error_results,
    normalize_client_tools,
)
from app.state.model import (
    MAX_TITLE_CHARS,
    NO_LIMITS,
    Chat,
    ChatStatus,
    Message,
    Owner,
    QueuedMessage,
    SendResult,
    UserLimits,
    default_title,
    normalize_user_content,
)
from app.state.usage import check_spend_limit

# A check that runs first in the transaction of a write, on its connection; raising aborts the
# write. Sub-agent tools pass the parent run's fence (app/state/subagents.py), so that a run which
# lost its chat writes nothing for it.
Fence = Callable[[Conn], Awaitable[None]]


Q = project_queries()


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
    chat_id: uuid.UUID | None = None,
    tools: object = None,
    server_tool_names: Collection[str] = (),
    mcp_server_ids: list[uuid.UUID] | None = None,
) -> tuple[Chat, Message]:
    """Insert a pending chat and its first user message in one transaction. `chat_id`: an id
    the client chose (the AI SDK names its chats); Conflict when a chat has it already, whoever
    owns it. `tools`: the chat's client tool definitions (app/state/client_tools.py);
    `server_tool_names` are the names they may not take. `mcp_server_ids`: the MCP servers its
    runs use (None: every enabled one; a child inherits its parent's)."""
    parts = normalize_user_content(content)
    client_tools = (
        normalize_client_tools(tools, reserved=server_tool_names) if tools is not None else []
    )
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
        if mcp_server_ids is not None:
            mcp_server_ids = await mcp_servers.check_server_ids(conn, mcp_server_ids)
        root_chat_id: uuid.UUID | None = None
        if parent_chat_id is not None:
            parent = await _lock_chat(conn, owner, parent_chat_id)
            root_chat_id = parent["root_chat_id"] or parent["id"]
            client_type = parent["client_type"]  # children inherit their parent's
            if model_config_id is None:  # and its model, unless told otherwise
                model_config_id = parent["model_config_id"]
            if mcp_server_ids is None:  # and its MCP servers (a deleted one is skipped)
                mcp_server_ids = parent["mcp_server_ids"]
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
            chat_id,
            json.dumps(client_tools),
            mcp_server_ids,
        )
        if chat_row is None:
            raise Conflict("a chat with this id exists")
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
    tools: object = None,
    server_tool_names: Collection[str] = (),
) -> SendResult:
    """waiting/error -> pending with the new message; pending/running/requires_action -> queued
    (bounded; a requires_action chat answers it once its turn is over).

    An idle chat may still have queued messages (a Stop leaves the queue as it was; so does an
    error). Then the new message goes to the tail of that queue and the queue's head is sent
    instead (the chat goes pending, the run then works through the queue in order): messages
    are answered in the order they were sent, and the result is `queued`.

    `tools` (when not None) replaces the chat's client tools at once, whatever the status: the
    next step of the chat, in this turn or the next, is offered them."""
    parts = normalize_user_content(content)
    client_tools = (
        normalize_client_tools(tools, reserved=server_tool_names) if tools is not None else None
    )
    async with transaction(pool) as conn:
        if fence is not None:
            await fence(conn)
        chat_row = await _lock_unarchived_chat(conn, owner, chat_id, "send a message to")
        await check_spend_limit(
            conn, organization_id=chat_row["organization_id"], user_id=owner.user_id
        )
        if client_tools is not None and client_tools != json.loads(chat_row["client_tools"]):
            await conn.execute(Q.sql("chats_set_client_tools"), chat_id, json.dumps(client_tools))
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


async def send_or_create(
    pool: asyncpg.Pool,
    owner: Owner,
    chat_id: uuid.UUID,
    content: object,
    *,
    queue_limit: int,
    limits: UserLimits = NO_LIMITS,
    model_config_id: uuid.UUID | None = None,
    client_type: str = "api",
) -> SendResult:
    """Send to the caller's chat `chat_id` (or queue, as send_message does), creating it with
    this first message when no chat has that id (the AI SDK's clients choose their chat ids).
    Another user's chat is NotFound, like a missing one of a transition."""
    try:
        return await send_message(
            pool, owner, chat_id, content, queue_limit=queue_limit, limits=limits
        )
    except NotFound:
        pass
    try:
        chat, message = await create_chat(
            pool,
            owner,
            content,
            model_config_id=model_config_id,
            client_type=client_type,
            limits=limits,
            chat_id=chat_id,
        )
        return SendResult(chat, message=message)
    except Conflict:
        # Created meanwhile: by this caller (a concurrent first request), then this is a send;
        # by another user, then send_message answers NotFound.
        return await send_message(
            pool, owner, chat_id, content, queue_limit=queue_limit, limits=limits
        )


async def interrupt(pool: asyncpg.Pool, owner: Owner, chat_id: uuid.UUID) -> Chat:
    """Stop. pending -> waiting at once; running -> marked, the worker completes it;
    requires_action -> waiting at once, the pending calls answered "interrupted" (is_error);
    idle chats are left as they are (Stop is idempotent)."""
    async with transaction(pool) as conn:
        chat_row = await _lock_chat(conn, owner, chat_id)
        updated: asyncpg.Record | None = chat_row
        # Stop reaches the chat's sub-agents too (they work for the turn being stopped).
        await conn.execute(Q.sql("chats_interrupt_children"), chat_id)
        if chat_row["status"] == "pending":
            updated = await conn.fetchrow(Q.sql("chats_interrupt_pending"), chat_id)
        elif chat_row["status"] == "running":
            updated = await conn.fetchrow(Q.sql("chats_request_interrupt"), chat_id)
        elif chat_row["status"] == "requires_action":
            updated = await _close_action(conn, chat_row, INTERRUPTED_RESULT)
        assert updated is not None
        return Chat.from_record(updated)


async def _close_action(conn: Conn, chat_row: asyncpg.Record, reason: str) -> asyncpg.Record:
    """requires_action -> waiting without the client's results (Stop, archive, promote): every
    pending call gets an error result saying why, so that the history never holds a tool call
    without its result (the next prompt would be refused by the providers), then the chat is
    the user's again. The caller holds the row lock."""
    pending: list[dict[str, Any]] = json.loads(chat_row["pending_tool_calls"])
    await conn.execute(
        Q.sql("chats_insert_message"),
        chat_row["id"],
        "tool",
        json.dumps(error_results(pending, reason)),
    )
    closed = await conn.fetchrow(Q.sql("chats_close_action"), chat_row["id"])
    assert closed is not None
    return closed


async def submit_tool_results(
    pool: asyncpg.Pool, owner: Owner, chat_id: uuid.UUID, results: object
) -> tuple[Chat, Message]:
    """The client's answer to the pending tool calls: requires_action -> pending with one `tool`
    message holding a result for every pending call, in one transaction; any replica then
    continues the turn. Refused, changing nothing: a chat that is not requires_action (409: e.g.
    a late answer, after a time-out, a Stop or another client's answer), results for calls that
    are not pending (409: a late answer for an earlier turn), a pending call left unanswered or
    one answered twice (400)."""
    checked = check_results_shape(results)
    async with transaction(pool) as conn:
        chat_row = await _lock_chat(conn, owner, chat_id)
        if chat_row["status"] != "requires_action":
            raise InvalidTransition(
                transition="post tool results to",
                from_status=chat_row["status"],
                reason="it waits for no tool results (they may have timed out, been answered"
                " or been interrupted)",
            )
        pending: list[dict[str, Any]] = json.loads(chat_row["pending_tool_calls"])
        parts = answer_parts(pending, checked)
        message_row = await conn.fetchrow(
            Q.sql("chats_insert_message"), chat_id, "tool", json.dumps(parts)
        )
        updated = await conn.fetchrow(Q.sql("chats_answer_action"), chat_id)
        assert message_row is not None and updated is not None
        return Chat.from_record(updated), Message.from_record(message_row)


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
        return await _replace_from(
            conn,
            owner,
            chat_row=chat_row,
            message_id=message_id,
            content_json=json.dumps(parts),
            limits=limits,
        )


async def regenerate(
    pool: asyncpg.Pool, owner: Owner, chat_id: uuid.UUID, *, limits: UserLimits = NO_LIMITS
) -> Message:
    """Run the chat's last user message again: an edit of that message with its own content
    (the AI SDK's "regenerate"), found and replaced under the chat's lock."""
    async with transaction(pool) as conn:
        chat_row = await _lock_unarchived_chat(conn, owner, chat_id, "regenerate the answer of")
        message_row = await conn.fetchrow(Q.sql("chats_last_user_message"), chat_id)
        if message_row is None:
            raise NotFound("the chat has no user message to answer again")
        return await _replace_from(
            conn,
            owner,
            chat_row=chat_row,
            message_id=message_row["id"],
            content_json=message_row["content"],
            limits=limits,
        )


async def _replace_from(
    conn: Conn,
    owner: Owner,
    *,
    chat_row: asyncpg.Record,
    message_id: int,
    content_json: str,
    limits: UserLimits,
) -> Message:
    """The edit itself, on the locked chat: message `message_id` and everything after it are
    soft-deleted, `content_json` becomes the new user message, the queue is cleared and the
    chat starts over (pending)."""
    chat_id = chat_row["id"]
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
    new_row = await conn.fetchrow(Q.sql("chats_insert_message"), chat_id, "user", content_json)
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
        if chat_row["status"] == "requires_action":
            # As on a running chat, "send this now" interrupts the turn: the pending calls are
            # answered "interrupted", then the message is sent at once (nothing to wait for).
            if await conn.fetchval(Q.sql("chats_queued_exists"), queued_id, chat_id) is None:
                raise NotFound("queued message not found")
            chat_row = await _close_action(conn, chat_row, INTERRUPTED_RESULT)
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
    """PATCH title and/or archived. Archiving a busy chat stops it (-> waiting; the pending calls
    of a requires_action chat get error results). Unarchiving
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
        if archived and current["status"] == "requires_action":
            # Archiving stops the chat: the pending calls are answered (is_error) first.
            await _close_action(conn, current, ARCHIVED_RESULT)
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


async def last_user_message(pool: asyncpg.Pool, owner: Owner, chat_id: uuid.UUID) -> Message | None:
    """The user message the chat's latest turn answers; None when the chat is not the caller's
    (or has none)."""
    async with transaction(pool) as conn:
        if await conn.fetchrow(Q.sql("chats_get_for_owner"), chat_id, owner.user_id) is None:
            return None
        row = await conn.fetchrow(Q.sql("chats_last_user_message"), chat_id)
    return Message.from_record(row) if row is not None else None


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


async def count_requiring_action(pool: asyncpg.Pool) -> int:
    """How many chats wait for their clients' tool results, all replicas together."""
    count: int = await pool.fetchval(Q.sql("chats_count_requiring_action"))
    return count
