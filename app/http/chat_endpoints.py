"""The chat routes' handlers: create, list, read, send, edit, Stop, queue operations, archive,
tool results (and the built-in client tool's definition). They translate HTTP to calls of the
state machine (app/state/chats.py); they never pick an error status (the middleware does) and
never run SQL."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from app.errors import ValidationFailed
from app.http.models import (
    PAGE_CURSOR_PATTERN,
    ClientToolDefinition,
    CreateChatRequest,
    EditMessageRequest,
    ListChatsQuery,
    ListMessagesQuery,
    SendMessageRequest,
    TextPart,
    ToolResultsRequest,
    UpdateChatRequest,
)
from app.http.routing import Call, json_response
from app.state import chats
from app.state.client_tools import ASK_USER_QUESTION_TOOL
from app.state.model import Chat, Message, UserLimits


def _content(value: str | tuple[TextPart, ...] | list[TextPart]) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    return [part.model_dump() for part in value]


def _tools(value: list[ClientToolDefinition] | None) -> list[dict[str, Any]] | None:
    """The definitions as the client wrote them (defaults the model filled in left out)."""
    if value is None:
        return None
    return [tool.model_dump(mode="json", exclude_unset=True) for tool in value]


PAGE_CURSOR = re.compile(PAGE_CURSOR_PATTERN)


def _limits(call: Call) -> UserLimits:
    """The per-user limits of docs/operations.md, from this replica's settings."""
    return UserLimits(
        max_chats=call.settings.max_chats_per_user,
        max_pending_chats=call.settings.max_pending_chats_per_user,
    )


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


MICROSECOND = timedelta(microseconds=1)


def encode_page_cursor(chat: Chat) -> str:
    """`<created_at in microseconds since the epoch>:<id>`: exact (PostgreSQL keeps
    microseconds), and of a shape the document states (PAGE_CURSOR_PATTERN), so that any string
    the document accepts is a cursor the server accepts."""
    return f"{(chat.created_at - EPOCH) // MICROSECOND}:{chat.id}"


def decode_page_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The query model already checked PAGE_CURSOR_PATTERN; this only splits it."""
    micros, _, chat_id = cursor.partition(":")
    if not PAGE_CURSOR.fullmatch(cursor):
        raise ValidationFailed(
            "invalid page cursor",
            validations=[{"field": "before", "detail": "pass the `next` value of a page"}],
        )
    return EPOCH + int(micros) * MICROSECOND, uuid.UUID(chat_id)


async def create_chat(call: Call) -> web.StreamResponse:
    body = await call.body(CreateChatRequest)
    chat, _message = await chats.create_chat(
        call.pool,
        call.owner,
        _content(body.content),
        title=body.title,
        model_config_id=body.model_config_id,
        client_type=body.client_type,
        limits=_limits(call),
        tools=_tools(body.tools),
        server_tool_names=call.server_tool_names(),
        mcp_server_ids=body.mcp_server_ids,
    )
    return json_response(chat.to_json(), status=201)


async def list_chats(call: Call) -> web.StreamResponse:
    query = call.query(ListChatsQuery)
    before = decode_page_cursor(query.before) if query.before else None
    found = await chats.list_chats(
        call.pool,
        call.owner,
        status=query.status,
        archived=query.archived,
        limit=query.limit + 1,
        before=before,
    )
    page = found[: query.limit]
    next_cursor = encode_page_cursor(page[-1]) if len(found) > query.limit else None
    return json_response({"chats": [chat.to_json() for chat in page], "next": next_cursor})


async def get_chat(call: Call) -> web.StreamResponse:
    chat = await chats.get_chat(call.pool, call.owner, call.path_uuid("id"))
    return json_response(chat.to_json())


async def update_chat(call: Call) -> web.StreamResponse:
    chat_id = call.path_uuid("id")
    body = await call.body(UpdateChatRequest)
    chat = await chats.update_chat(
        call.pool,
        call.owner,
        chat_id,
        title=body.title,
        archived=body.archived,
        limits=_limits(call),
    )
    return json_response(chat.to_json())


async def list_messages(call: Call) -> web.StreamResponse:
    chat_id = call.path_uuid("id")
    query = call.query(ListMessagesQuery)
    messages, queued = await chats.list_messages(
        call.pool, call.owner, chat_id, after_id=query.after_id, limit=query.limit
    )
    return json_response(
        {
            "messages": [message.to_json() for message in messages],
            "queued": [item.to_json() for item in queued],
            "next": messages[-1].id if len(messages) == query.limit else None,
        }
    )


async def send_message(call: Call) -> web.StreamResponse:
    chat_id = call.path_uuid("id")
    body = await call.body(SendMessageRequest)
    result = await chats.send_message(
        call.pool,
        call.owner,
        chat_id,
        _content(body.content),
        queue_limit=call.settings.queue_limit,
        limits=_limits(call),
        tools=_tools(body.tools),
        server_tool_names=call.server_tool_names(),
    )
    if result.message is not None:
        return json_response({"message": result.message.to_json()}, status=201)
    assert result.queued is not None
    return json_response({"queued": result.queued.to_json()}, status=202)


async def edit_message(call: Call) -> web.StreamResponse:
    chat_id = call.path_uuid("id")
    message_id = call.path_id("mid")
    body = await call.body(EditMessageRequest)
    message = await chats.edit_message(
        call.pool, call.owner, chat_id, message_id, _content(body.content), limits=_limits(call)
    )
    return json_response(message.to_json())


async def interrupt(call: Call) -> web.StreamResponse:
    chat = await chats.interrupt(call.pool, call.owner, call.path_uuid("id"))
    return json_response(chat.to_json())


async def delete_queued(call: Call) -> web.StreamResponse:
    await chats.delete_queued(call.pool, call.owner, call.path_uuid("id"), call.path_id("qid"))
    return web.Response(status=204)


async def promote_queued(call: Call) -> web.StreamResponse:
    promoted = await chats.promote_queued(
        call.pool, call.owner, call.path_uuid("id"), call.path_id("qid"), limits=_limits(call)
    )
    if isinstance(promoted, Message):
        return json_response(promoted.to_json())
    return json_response({"queued": promoted.to_json()}, status=202)


async def submit_tool_results(call: Call) -> web.StreamResponse:
    chat_id = call.path_uuid("id")
    body = await call.body(ToolResultsRequest)
    chat, message = await chats.submit_tool_results(
        call.pool,
        call.owner,
        chat_id,
        [result.model_dump(mode="json") for result in body.results],
    )
    return json_response({"chat": chat.to_json(), "message": message.to_json()})


async def ask_user_question_tool(call: Call) -> web.StreamResponse:
    del call
    return json_response(ASK_USER_QUESTION_TOOL)
