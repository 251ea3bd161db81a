"""Every route of the HTTP API, declared once (docs/api.md): method, path, handler, request models
and documented answers. The router, the authentication and admin checks and the OpenAPI document
are all derived from these declarations (app/http/routing.py); the handlers live in the
*_endpoints.py modules beside this one."""

from __future__ import annotations

from app.http import (
    admin_endpoints,
    ai_sdk_endpoints,
    chat_endpoints,
    mcp_endpoints,
    ops_endpoints,
    session_endpoints,
    sessions,
    stream_endpoints,
    web_endpoints,
)
from app.http.models import (
    AiSdkChatRequest,
    ChatList,
    ChatListChangeEvent,
    ChatOut,
    ChatStreamEvent,
    ClientToolDefinition,
    CreateChatRequest,
    CreateMcpServerRequest,
    CreateModelConfigRequest,
    CreateSessionRequest,
    EditMessageRequest,
    ErrorBody,
    Health,
    LimitBody,
    ListChatsQuery,
    ListMessagesQuery,
    LoginCodeRequest,
    McpServerList,
    McpServerOut,
    MessageEnvelope,
    MessageList,
    MessageOut,
    ModelConfigList,
    ModelConfigOut,
    QueuedEnvelope,
    ReplicaList,
    SendMessageRequest,
    SessionOut,
    SpendLimitBody,
    StreamQuery,
    ToolResultsAnswer,
    ToolResultsRequest,
    UIMessageChunk,
    UpdateChatRequest,
    UpdateMcpServerRequest,
    UpdateModelConfigRequest,
)
from app.http.routing import Answer, PathParamKind, Route

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


_CHAT: dict[str, PathParamKind] = {"id": "uuid"}


_CHAT_MESSAGE: dict[str, PathParamKind] = {"id": "uuid", "mid": "id"}


_CHAT_QUEUED: dict[str, PathParamKind] = {"id": "uuid", "qid": "id"}


_CONFIG: dict[str, PathParamKind] = {"id": "uuid"}


V1 = "/api/v1"


REST_ROUTES: list[Route] = [
    Route(
        "POST",
        f"{V1}/chats",
        chat_endpoints.create_chat,
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
        chat_endpoints.list_chats,
        "listChats",
        "The caller's chats, newest first, paged by `before`",
        query=ListChatsQuery,
        answers={200: Answer("one page", ChatList), **_errors(400, 401)},
    ),
    Route(
        "GET",
        f"{V1}/chats/{{id}}",
        chat_endpoints.get_chat,
        "getChat",
        "One chat",
        path_params=_CHAT,
        answers={200: Answer("the chat", ChatOut), **_errors(400, 401, 404)},
    ),
    Route(
        "PATCH",
        f"{V1}/chats/{{id}}",
        chat_endpoints.update_chat,
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
        chat_endpoints.list_messages,
        "listMessages",
        "Visible messages after `after_id` (id order) and the queue",
        path_params=_CHAT,
        query=ListMessagesQuery,
        answers={200: Answer("one page and the queue", MessageList), **_errors(400, 401, 404)},
    ),
    Route(
        "POST",
        f"{V1}/chats/{{id}}/messages",
        chat_endpoints.send_message,
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
        chat_endpoints.edit_message,
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
        chat_endpoints.interrupt,
        "interruptChat",
        "Stop: a pending chat goes back to waiting, a running one is stopped by its worker,"
        " a requires_action one goes to waiting with its pending calls answered as errors",
        path_params=_CHAT,
        answers={200: Answer("the chat", ChatOut), **_errors(400, 401, 404)},
    ),
    Route(
        "POST",
        f"{V1}/chats/{{id}}/tool-results",
        chat_endpoints.submit_tool_results,
        "submitToolResults",
        "Answer the pending client tool calls of a requires_action chat; it goes pending",
        description="A result for every pending call, each once (400 otherwise); results for"
        " calls that are not pending (a late answer for an earlier turn) and a chat that is not"
        " requires_action answer 409 and change nothing. See docs/requires_action.md.",
        path_params=_CHAT,
        body=ToolResultsRequest,
        answers={
            200: Answer("the chat (pending) and the tool message", ToolResultsAnswer),
            **_errors(400, 401, 404, 409, 413),
        },
    ),
    Route(
        "GET",
        f"{V1}/tools/ask_user_question",
        chat_endpoints.ask_user_question_tool,
        "getAskUserQuestionTool",
        "The definition of the built-in client tool ask_user_question",
        description="A client that can put a question to its user declares this definition in"
        ' `tools`; it answers the calls with `{"answer": text}`.',
        tag="tools",
        answers={200: Answer("the definition", ClientToolDefinition), 401: E401},
    ),
    Route(
        "DELETE",
        f"{V1}/chats/{{id}}/queue/{{qid}}",
        chat_endpoints.delete_queued,
        "deleteQueued",
        "Remove a queued message",
        path_params=_CHAT_QUEUED,
        answers={204: Answer("removed"), **_errors(400, 401, 404)},
    ),
    Route(
        "POST",
        f"{V1}/chats/{{id}}/queue/{{qid}}/promote",
        chat_endpoints.promote_queued,
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
        admin_endpoints.list_model_configs,
        "listModelConfigs",
        "Model configs (admins also see disabled ones)",
        tag="model-configs",
        answers={200: Answer("the configs", ModelConfigList), **_errors(401)},
    ),
    Route(
        "POST",
        f"{V1}/model-configs",
        admin_endpoints.create_model_config,
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
        admin_endpoints.update_model_config,
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
        admin_endpoints.delete_model_config,
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
        f"{V1}/mcp-servers",
        mcp_endpoints.list_mcp_servers,
        "listMcpServers",
        "MCP servers, env and header values redacted (admins)",
        tag="mcp-servers",
        admin=True,
        answers={200: Answer("the servers", McpServerList), **_errors(401, 403)},
    ),
    Route(
        "POST",
        f"{V1}/mcp-servers",
        mcp_endpoints.create_mcp_server,
        "createMcpServer",
        "Register an MCP server (admins)",
        description="Its tools join every chat that chose it (or chose none), named"
        " `<name>__<tool>`. A stdio server is a command each replica runs on first use."
        " See docs/tools.md.",
        tag="mcp-servers",
        admin=True,
        body=CreateMcpServerRequest,
        answers={
            201: Answer("created", McpServerOut),
            **_errors(400, 401, 403, 413),
            409: Answer("the name is taken", ErrorBody),
        },
    ),
    Route(
        "PATCH",
        f"{V1}/mcp-servers/{{id}}",
        mcp_endpoints.update_mcp_server,
        "updateMcpServer",
        "Change an MCP server (admins)",
        description="Absent fields stay. A `transport` replaces the whole transport; an env or"
        " header value sent as `[redacted]` keeps the stored value of that name. Replicas"
        " reconnect when the transport changed and list the tools again after any change.",
        tag="mcp-servers",
        admin=True,
        path_params=_CONFIG,
        body=UpdateMcpServerRequest,
        answers={
            200: Answer("updated", McpServerOut),
            **_errors(400, 401, 403, 404, 413),
            409: Answer("the name is taken", ErrorBody),
        },
    ),
    Route(
        "DELETE",
        f"{V1}/mcp-servers/{{id}}",
        mcp_endpoints.delete_mcp_server,
        "deleteMcpServer",
        "Delete an MCP server (admins)",
        description="Chats that chose it keep running without its tools.",
        tag="mcp-servers",
        admin=True,
        path_params=_CONFIG,
        answers={204: Answer("deleted"), **_errors(400, 401, 403, 404)},
    ),
    Route(
        "GET",
        f"{V1}/replicas",
        admin_endpoints.list_replicas,
        "listReplicas",
        "Replicas with heartbeat ages and running chats (admins)",
        description="Hostnames, process ids and addresses are operational details: only"
        " admins see them (403 otherwise).",
        tag="operations",
        admin=True,
        answers={200: Answer("the replicas", ReplicaList), **_errors(401, 403)},
    ),
]


SYSTEM_ROUTES: list[Route] = [
    Route(
        "GET",
        "/healthz",
        ops_endpoints.healthz,
        "healthz",
        "Liveness",
        tag="operations",
        auth=False,
        answers={200: Answer("the process serves HTTP", Health)},
    ),
    Route(
        "GET",
        "/readyz",
        ops_endpoints.readyz,
        "readyz",
        "Readiness: database reachable and listener connected",
        tag="operations",
        auth=False,
        answers={
            200: Answer("ready", Health),
            503: Answer("not ready", Health),
        },
    ),
    Route(
        "GET",
        "/metrics",
        ops_endpoints.metrics,
        "metrics",
        "Prometheus metrics (text exposition of prometheus_client)",
        tag="operations",
        auth=False,
        answers={200: Answer("metrics", None, media_type="text/plain")},
    ),
    Route(
        "GET",
        f"{V1}/openapi.json",
        ops_endpoints.openapi,
        "openapi",
        "This document",
        tag="operations",
        answers={200: Answer("the OpenAPI document"), 401: E401},
    ),
]


# Every stream counts against the caller's `max_streams_per_user` on this replica.
E429_STREAMS = Answer(
    "too many open streams for this user on this replica (limit streams_per_user)", ErrorBody
)


STREAM_ROUTES: list[Route] = [
    # Before /chats/{id}: "watch" is not a chat id.
    Route(
        "GET",
        f"{V1}/chats/watch",
        stream_endpoints.watch_chats,
        "watchChats",
        "Server-Sent Events of the caller's chat-list changes",
        description="Events `created`, `updated` (status, title or archived changed) and"
        " `deleted` with the chat's summary; `resync` when changes may have been missed"
        " (list again). Subscribe first, then list.",
        tag="streams",
        answers={
            200: Answer("an SSE stream", ChatListChangeEvent, media_type="text/event-stream"),
            401: E401,
            429: E429_STREAMS,
        },
    ),
    Route(
        "GET",
        f"{V1}/chats/{{id}}/stream",
        stream_endpoints.chat_stream,
        "streamChat",
        "Server-Sent Events of one chat, resumable from any cursor",
        description="Frames: `id: <message id>:<part id>`, `event: <type>`, `data: <JSON>`;"
        " types status, message, message_part, queue, retry, error, action_required,"
        " history_reset;"
        " keep-alive comments. See docs/api.md.",
        tag="streams",
        path_params={"id": "uuid"},
        query=StreamQuery,
        headers={"Last-Event-ID": "Resume after this cursor (wins over ?after=)."},
        answers={
            200: Answer("an SSE stream", ChatStreamEvent, media_type="text/event-stream"),
            400: E400,
            401: E401,
            404: E404,
            429: E429_STREAMS,
        },
    ),
    Route(
        "GET",
        f"{V1}/chats/{{id}}/ws",
        stream_endpoints.chat_websocket,
        "streamChatWebSocket",
        "The same events over a WebSocket: one JSON event per text frame, with `cursor`",
        tag="streams",
        path_params={"id": "uuid"},
        query=StreamQuery,
        answers={
            101: Answer("switching to the WebSocket protocol", ChatStreamEvent),
            400: E400,
            401: E401,
            403: Answer("authenticated by the session cookie from another origin", ErrorBody),
            404: Answer("no such chat (or not yours)", ErrorBody),
            429: E429_STREAMS,
        },
    ),
]


# The Vercel AI SDK's transport (docs/api.md, "Vercel AI SDK"). Its streams count against
# `max_streams_per_user` like the others.
_UI_STREAM = Answer(
    "the answer as the AI SDK's UI message stream (header x-vercel-ai-ui-message-stream: v1):"
    " `data: <chunk>` events, then `data: [DONE]`",
    UIMessageChunk,
    media_type="text/event-stream",
)

AI_SDK_ROUTES: list[Route] = [
    Route(
        "POST",
        f"{V1}/ai-sdk/chats",
        ai_sdk_endpoints.send_messages,
        "aiSdkSendMessages",
        "Vercel AI SDK: send the last user message (or answer again) and stream the answer",
        description="The body of the AI SDK's `DefaultChatTransport`. The chat `id` is chosen"
        " by the client: a chat of the caller's is sent to (queued while it is busy), a new id"
        " creates the chat, another user's chat answers 404. `regenerate-message` edits the"
        " chat's last user message with its own content. See docs/api.md.",
        tag="ai-sdk",
        body=AiSdkChatRequest,
        answers={
            200: _UI_STREAM,
            **_errors(400, 401, 404, 413),
            409: E409_OR_SPEND,
            429: E429_QUEUE_OR_LIMIT,  # streams_per_user is a per-user limit too
        },
    ),
    Route(
        "GET",
        f"{V1}/ai-sdk/chats/{{id}}/stream",
        ai_sdk_endpoints.resume_stream,
        "aiSdkResumeStream",
        "Vercel AI SDK: the answer in progress from its start, then live (204 when idle)",
        description="What `useChat({resume: true})` asks on mount, on any replica.",
        tag="ai-sdk",
        path_params=_CHAT,
        answers={
            200: _UI_STREAM,
            204: Answer("the chat is not busy (not pending or running): nothing to resume"),
            400: E400,
            401: E401,
            404: E404,
            429: E429_LIMIT,  # streams_per_user
        },
    ),
]


# Browser sessions and the web page (docs/web.md).

E401_LOGIN = Answer("unknown token, or a login code that is unknown, expired or used", ErrorBody)
E401_SESSION = Answer("no valid session cookie", ErrorBody)
E403_ORIGIN = Answer("sent by a page of another origin", ErrorBody)

_COOKIE_NOTE = (
    f" Sets the `{sessions.COOKIE_NAME}` cookie (HttpOnly, SameSite=Strict, Path=/, Secure over"
    " https); see docs/web.md."
)

SESSION_ROUTES: list[Route] = [
    Route(
        "POST",
        f"{V1}/sessions",
        session_endpoints.create_session,
        "createSession",
        "Log a browser in with an API token",
        description="The answer carries the CSRF token to send with requests that change state."
        + _COOKIE_NOTE,
        tag="sessions",
        auth=False,
        body=CreateSessionRequest,
        answers={
            201: Answer("logged in", SessionOut),
            400: E400,
            401: E401_LOGIN,
            403: E403_ORIGIN,
            413: E413,
        },
    ),
    Route(
        "POST",
        f"{V1}/sessions/login-code",
        session_endpoints.create_session_from_login_code,
        "createSessionFromLoginCode",
        "Log a browser in with a one-time login code",
        description="The code of the URL `chatd serve` prints with the embedded database; each"
        " code works once, for a few minutes." + _COOKIE_NOTE,
        tag="sessions",
        auth=False,
        body=LoginCodeRequest,
        answers={
            201: Answer("logged in", SessionOut),
            400: E400,
            401: E401_LOGIN,
            403: E403_ORIGIN,
            413: E413,
        },
    ),
    Route(
        "GET",
        f"{V1}/sessions/current",
        session_endpoints.get_current_session,
        "getCurrentSession",
        "The browser session of the cookie: its user and CSRF token",
        description="401 without a valid session cookie (a bearer token is not a session).",
        tag="sessions",
        answers={200: Answer("the session", SessionOut), 401: E401_SESSION},
    ),
    Route(
        "DELETE",
        f"{V1}/sessions/current",
        session_endpoints.delete_current_session,
        "deleteCurrentSession",
        "Log out: the session ends and its cookie is cleared",
        tag="sessions",
        answers={
            204: Answer("logged out"),
            401: E401_SESSION,
            403: Answer("missing or wrong CSRF token", ErrorBody),
        },
    ),
]


_NOT_MODIFIED = Answer("not modified (the ETag sent in If-None-Match still matches)")


def web_routes() -> list[Route]:
    """The page and one route per file of app/web/static."""
    index = web_endpoints.STATIC_FILES[web_endpoints.INDEX]
    routes = [
        Route(
            "GET",
            path,
            web_endpoints.serve_static(index, page=True),
            operation_id,
            summary,
            tag="web",
            auth=False,
            answers={200: Answer("the page", None, media_type="text/html"), 304: _NOT_MODIFIED},
        )
        for path, operation_id, summary in (
            ("/", "webPage", "The web page (docs/web.md)"),
            (
                sessions.LOGIN_PATH,
                "webLoginPage",
                "The web page; with `#code=<code>` it logs in with a one-time code",
            ),
        )
    ]
    for name, static in web_endpoints.STATIC_FILES.items():
        if name == web_endpoints.INDEX:
            continue
        routes.append(
            Route(
                "GET",
                web_endpoints.STATIC_PREFIX + name,
                web_endpoints.serve_static(static, page=False),
                web_endpoints.static_operation_id(name),
                f"A file of the web page: {name}",
                tag="web",
                auth=False,
                answers={
                    200: Answer(name, None, media_type=static.content_type),
                    304: _NOT_MODIFIED,
                },
            )
        )
    return routes


WEB_ROUTES: list[Route] = web_routes()
# The routes anyone may open (the page must load before anyone is logged in).
PUBLIC_PATHS = frozenset(route.path for route in [*SESSION_ROUTES, *WEB_ROUTES] if not route.auth)


def all_routes() -> list[Route]:
    return [
        *SYSTEM_ROUTES,
        *STREAM_ROUTES,
        *REST_ROUTES,
        *AI_SDK_ROUTES,
        *SESSION_ROUTES,
        *WEB_ROUTES,
    ]
