"""The REST routes (docs/api.md) and their declarations. Handlers translate HTTP to calls of
the state machine (app/chats.py) and the admin data (app/admin.py); they never pick an error
status (the middleware does) and never run SQL."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from app import admin, chats
from app.errors import ValidationFailed
from app.http.api import Answer, Call, PathParamKind, Route, json_response
from app.http.models import (
    PAGE_CURSOR_PATTERN,
    ChatList,
    ChatOut,
    CreateChatRequest,
    CreateModelConfigRequest,
    EditMessageRequest,
    ErrorBody,
    LimitBody,
    ListChatsQuery,
    ListMessagesQuery,
    MessageEnvelope,
    MessageList,
    MessageOut,
    ModelConfigList,
    ModelConfigOut,
    QueuedEnvelope,
    ReplicaList,
    SendMessageRequest,
    SpendLimitBody,
    TextPart,
    UpdateChatRequest,
    UpdateModelConfigRequest,
)
from app.providers.pricing import validate_prices

# --------------------------------------------------------------------------------------------
# Common answers.

E400 = Answer("invalid input (validations lists each problem)", ErrorBody)
E401 = Answer("missing or invalid bearer token", ErrorBody)
E403 = Answer("admins only", ErrorBody)
E404 = Answer("no such chat (or not yours), or no such item", ErrorBody)
E409 = Answer("not allowed in the chat's current state", ErrorBody)
E413 = Answer("request body too large", ErrorBody)
E409_SPEND = Answer("spend limit reached", SpendLimitBody)
E409_OR_SPEND = Answer(
    "not allowed in the chat's current state (e.g. archived), or spend limit reached",
    ErrorBody,
    alternatives=(SpendLimitBody,),
)
E429_QUEUE_OR_LIMIT = Answer(
    "the chat's queue is full (QueueFull), or a per-user limit is reached (LimitReached)",
    ErrorBody,
    alternatives=(LimitBody,),
)
E429_LIMIT = Answer("a per-user limit is reached; the body names it", LimitBody)


def _errors(*statuses: int) -> dict[int, Answer]:
    table = {400: E400, 401: E401, 403: E403, 404: E404, 409: E409, 413: E413}
    return {status: table[status] for status in statuses}


def _content(value: str | tuple[TextPart, ...] | list[TextPart]) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    return [part.model_dump() for part in value]


# --------------------------------------------------------------------------------------------
# Chats.

PAGE_CURSOR = re.compile(PAGE_CURSOR_PATTERN)


def _limits(call: Call) -> chats.UserLimits:
    """The per-user limits of docs/operations.md, from this replica's settings."""
    return chats.UserLimits(
        max_chats=call.settings.max_chats_per_user,
        max_pending_chats=call.settings.max_pending_chats_per_user,
    )


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def encode_page_cursor(chat: chats.Chat) -> str:
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
    if isinstance(promoted, chats.Message):
        return json_response(promoted.to_json())
    return json_response({"queued": promoted.to_json()}, status=202)


# --------------------------------------------------------------------------------------------
# Model configs and replicas.

_NUMERIC_OPTIONS = {
    "token_delay_ms": (0.0, 60_000.0),
    "startup_timeout_s": (0.0, 86_400.0),
    "silence_timeout_s": (0.0, 86_400.0),
}


def _check_options(options: dict[str, Any] | None) -> None:
    if options is None:
        return
    try:
        validate_prices(options)
    except ValueError as exc:
        raise ValidationFailed(
            "invalid price option", validations=[{"field": "options", "detail": str(exc)[:200]}]
        ) from None
    for name, (low, high) in _NUMERIC_OPTIONS.items():
        value = options.get(name)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ValidationFailed(
                f"options.{name} must be a number between {low:g} and {high:g}",
                validations=[{"field": f"options.{name}", "detail": "out of range"}],
            )


async def list_model_configs(call: Call) -> web.StreamResponse:
    configs = await admin.list_model_configs(call.pool, include_disabled=call.me.is_admin)
    return json_response({"model_configs": [config.to_json() for config in configs]})


async def create_model_config(call: Call) -> web.StreamResponse:
    body = await call.body(CreateModelConfigRequest)
    _check_options(body.options)
    config = await admin.create_model_config(
        call.pool,
        provider=body.provider,
        model=body.model,
        display_name=body.display_name,
        context_limit=body.context_limit,
        compression_threshold=body.compression_threshold,
        is_default=body.is_default,
        enabled=body.enabled,
        options=body.options,
    )
    return json_response(config.to_json(), status=201)


async def update_model_config(call: Call) -> web.StreamResponse:
    config_id = call.path_uuid("id")
    body = await call.body(UpdateModelConfigRequest)
    _check_options(body.options)
    config = await admin.update_model_config(
        call.pool,
        config_id,
        admin.ModelConfigChanges(
            provider=body.provider,
            model=body.model,
            display_name=body.display_name,
            context_limit=body.context_limit,
            compression_threshold=body.compression_threshold,
            is_default=body.is_default,
            enabled=body.enabled,
            options=body.options,
        ),
    )
    return json_response(config.to_json())


async def delete_model_config(call: Call) -> web.StreamResponse:
    await admin.delete_model_config(call.pool, call.path_uuid("id"))
    return web.Response(status=204)


async def list_replicas(call: Call) -> web.StreamResponse:
    return json_response({"replicas": await admin.list_replicas(call.pool)})


# --------------------------------------------------------------------------------------------
# Declarations.

_CHAT: dict[str, PathParamKind] = {"id": "uuid"}
_CHAT_MESSAGE: dict[str, PathParamKind] = {"id": "uuid", "mid": "id"}
_CHAT_QUEUED: dict[str, PathParamKind] = {"id": "uuid", "qid": "id"}
_CONFIG: dict[str, PathParamKind] = {"id": "uuid"}
V1 = "/api/v1"

REST_ROUTES: list[Route] = [
    Route(
        "POST",
        f"{V1}/chats",
        create_chat,
        "createChat",
        "Create a chat with its first message (it starts pending)",
        body=CreateChatRequest,
        answers={
            201: Answer("the new chat", ChatOut),
            **_errors(400, 401, 413),
            409: E409_SPEND,
            429: E429_LIMIT,
        },
    ),
    Route(
        "GET",
        f"{V1}/chats",
        list_chats,
        "listChats",
        "The caller's chats, newest first, paged by `before`",
        query=ListChatsQuery,
        answers={200: Answer("one page", ChatList), **_errors(400, 401)},
    ),
    Route(
        "GET",
        f"{V1}/chats/{{id}}",
        get_chat,
        "getChat",
        "One chat",
        path_params=_CHAT,
        answers={200: Answer("the chat", ChatOut), **_errors(400, 401, 404)},
    ),
    Route(
        "PATCH",
        f"{V1}/chats/{{id}}",
        update_chat,
        "updateChat",
        "Change the title or archive (archiving a busy chat stops it)",
        path_params=_CHAT,
        body=UpdateChatRequest,
        answers={
            200: Answer("the chat", ChatOut),
            **_errors(400, 401, 404, 409, 413),
            429: Answer("unarchiving would pass the chats_per_user limit", LimitBody),
        },
    ),
    Route(
        "GET",
        f"{V1}/chats/{{id}}/messages",
        list_messages,
        "listMessages",
        "Visible messages after `after_id` (id order) and the queue",
        path_params=_CHAT,
        query=ListMessagesQuery,
        answers={200: Answer("one page and the queue", MessageList), **_errors(400, 401, 404)},
    ),
    Route(
        "POST",
        f"{V1}/chats/{{id}}/messages",
        send_message,
        "sendMessage",
        "Send a user message: 201 when the chat was idle, 202 queued while it is busy",
        path_params=_CHAT,
        body=SendMessageRequest,
        answers={
            201: Answer("sent: the chat is pending", MessageEnvelope),
            202: Answer("queued behind the current turn", QueuedEnvelope),
            **_errors(400, 401, 404, 413),
            409: E409_OR_SPEND,
            429: E429_QUEUE_OR_LIMIT,
        },
    ),
    Route(
        "PATCH",
        f"{V1}/chats/{{id}}/messages/{{mid}}",
        edit_message,
        "editMessage",
        "Edit a user message: later history is dropped and the chat starts over",
        path_params=_CHAT_MESSAGE,
        body=EditMessageRequest,
        answers={
            200: Answer("the new message", MessageOut),
            **_errors(400, 401, 404, 413),
            409: E409_OR_SPEND,
            429: E429_LIMIT,
        },
    ),
    Route(
        "POST",
        f"{V1}/chats/{{id}}/interrupt",
        interrupt,
        "interruptChat",
        "Stop: a pending chat goes back to waiting, a running one is stopped by its worker",
        path_params=_CHAT,
        answers={200: Answer("the chat", ChatOut), **_errors(400, 401, 404)},
    ),
    Route(
        "DELETE",
        f"{V1}/chats/{{id}}/queue/{{qid}}",
        delete_queued,
        "deleteQueued",
        "Remove a queued message",
        path_params=_CHAT_QUEUED,
        answers={204: Answer("removed"), **_errors(400, 401, 404)},
    ),
    Route(
        "POST",
        f"{V1}/chats/{{id}}/queue/{{qid}}/promote",
        promote_queued,
        "promoteQueued",
        "Send a queued message now",
        description="On an idle chat the message is sent at once (200). On a running chat the"
        " run is interrupted and the message goes to the head of the queue (202); it is sent as"
        " soon as the partial answer is saved.",
        path_params=_CHAT_QUEUED,
        answers={
            200: Answer("sent", MessageOut),
            202: Answer("the run is being interrupted; the message goes first", QueuedEnvelope),
            **_errors(400, 401, 404, 409),
            429: E429_LIMIT,
        },
    ),
    Route(
        "GET",
        f"{V1}/model-configs",
        list_model_configs,
        "listModelConfigs",
        "Model configs (admins also see disabled ones)",
        tag="model-configs",
        answers={200: Answer("the configs", ModelConfigList), **_errors(401)},
    ),
    Route(
        "POST",
        f"{V1}/model-configs",
        create_model_config,
        "createModelConfig",
        "Create a model config (admins)",
        tag="model-configs",
        admin=True,
        body=CreateModelConfigRequest,
        answers={201: Answer("created", ModelConfigOut), **_errors(400, 401, 403, 409, 413)},
    ),
    Route(
        "PATCH",
        f"{V1}/model-configs/{{id}}",
        update_model_config,
        "updateModelConfig",
        "Change a model config (admins)",
        description="The default config cannot be disabled or stop being the default (409):"
        " make another config the default instead.",
        tag="model-configs",
        admin=True,
        path_params=_CONFIG,
        body=UpdateModelConfigRequest,
        answers={200: Answer("updated", ModelConfigOut), **_errors(400, 401, 403, 404, 409, 413)},
    ),
    Route(
        "DELETE",
        f"{V1}/model-configs/{{id}}",
        delete_model_config,
        "deleteModelConfig",
        "Delete a model config (admins)",
        description="A config that chats or messages still use, and the default config, are"
        ' not deleted (409); disable it instead with PATCH {"enabled": false}.',
        tag="model-configs",
        admin=True,
        path_params=_CONFIG,
        answers={204: Answer("deleted"), **_errors(400, 401, 403, 404, 409)},
    ),
    Route(
        "GET",
        f"{V1}/replicas",
        list_replicas,
        "listReplicas",
        "Replicas with heartbeat ages and running chats (admins)",
        description="Hostnames, process ids and addresses are operational details: only"
        " admins see them (403 otherwise).",
        tag="operations",
        admin=True,
        answers={200: Answer("the replicas", ReplicaList), **_errors(401, 403)},
    ),
]
