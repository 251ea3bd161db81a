"""The aiohttp application: every route declared once (app/http/routes.py for REST, below for
the system and stream routes), one error middleware, the stream hubs opened and closed in
cleanup_ctx, and streams told to end on shutdown (WebSockets with GOING_AWAY)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
from aiohttp import WSCloseCode, web

from app.config import Settings
from app.http import keys
from app.http.api import Answer, Call, Route, add_routes, json_response
from app.http.errors import error_middleware
from app.http.metrics import Collector, listener_metrics, render, stream_metrics
from app.http.models import (
    ChatListChangeEvent,
    ChatStreamEvent,
    ErrorBody,
    Health,
    StreamQuery,
)
from app.http.openapi import openapi_document
from app.http.routes import E400, E401, E404, REST_ROUTES, V1
from app.http.streams import chat_stream, chat_websocket, watch_chats
from app.http.web_endpoints import SESSION_ROUTES, WEB_ROUTES
from app.listener import Listener
from app.log import get_logger
from app.streams import StreamHubs

log = get_logger(__name__)

# Kept importable from here: the keys used to be defined in this module.
SETTINGS = keys.SETTINGS
POOL = keys.POOL
LISTENER = keys.LISTENER
STREAM_HUBS = keys.STREAM_HUBS
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")
METRICS: web.AppKey[list[Collector]] = web.AppKey("metrics")


async def healthz(_call: Call) -> web.StreamResponse:
    """Liveness: the process serves HTTP."""
    return json_response({"status": "ok"})


async def readyz(call: Call) -> web.StreamResponse:
    """Readiness: the database answers and the listener is connected. Public, so the answer
    says only which of the two is missing; the error itself goes to the log."""
    try:
        await call.pool.fetchval("SELECT 1", timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        log.warning("http.readyz_database_unreachable", error=repr(exc))
        return json_response(
            {"status": "unavailable", "message": "database unreachable"}, status=503
        )
    if not call.listener.connected:
        return json_response(
            {"status": "unavailable", "message": "listener not connected"}, status=503
        )
    return json_response({"status": "ok"})


async def metrics(call: Call) -> web.StreamResponse:
    collectors = call.request.app[METRICS]
    return web.Response(
        text=render(collectors),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


async def openapi(call: Call) -> web.StreamResponse:
    return json_response(call.request.app[OPENAPI])


SYSTEM_ROUTES: list[Route] = [
    Route(
        "GET",
        "/healthz",
        healthz,
        "healthz",
        "Liveness",
        tag="operations",
        auth=False,
        answers={200: Answer("the process serves HTTP", Health)},
    ),
    Route(
        "GET",
        "/readyz",
        readyz,
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
        metrics,
        "metrics",
        "Prometheus metrics (text format 0.0.4)",
        tag="operations",
        auth=False,
        answers={200: Answer("metrics", None, media_type="text/plain")},
    ),
    Route(
        "GET",
        f"{V1}/openapi.json",
        openapi,
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
        watch_chats,
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
        chat_stream,
        "streamChat",
        "Server-Sent Events of one chat, resumable from any cursor",
        description="Frames: `id: <message id>:<part id>`, `event: <type>`, `data: <JSON>`;"
        " types status, message, message_part, queue, retry, error, history_reset;"
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
        chat_websocket,
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


def all_routes() -> list[Route]:
    return [*SYSTEM_ROUTES, *STREAM_ROUTES, *REST_ROUTES, *SESSION_ROUTES, *WEB_ROUTES]


async def _stream_hubs(app: web.Application) -> AsyncIterator[None]:
    hubs = StreamHubs(
        app[keys.POOL],
        app[keys.LISTENER],
        max_queued_events_per_client=app[keys.SETTINGS].max_queued_events_per_client,
    )
    app[keys.STREAM_HUBS] = hubs
    app[METRICS] = [stream_metrics(hubs), *app[METRICS]]
    yield
    await hubs.aclose()


async def _on_shutdown(app: web.Application) -> None:
    """Streams end before the graceful-shutdown wait: SSE clients get a final `shutdown` event
    with their cursor, WebSockets a close with GOING_AWAY."""
    app[keys.SHUTDOWN].set()
    if keys.STREAM_HUBS in app:
        app[keys.STREAM_HUBS].close_all()
    sockets = app[keys.WEBSOCKETS]
    await asyncio.gather(
        *(
            ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
            for ws in list(sockets)
        ),
        return_exceptions=True,
    )


def build_app(
    *,
    settings: Settings,
    pool: asyncpg.Pool,
    listener: Listener,
    metrics: Sequence[Collector] = (),
) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[keys.SETTINGS] = settings
    app[keys.POOL] = pool
    app[keys.LISTENER] = listener
    app[keys.WEBSOCKETS] = set()
    app[keys.SHUTDOWN] = asyncio.Event()
    app[METRICS] = [listener_metrics(listener), *metrics]
    routes = all_routes()
    app[OPENAPI] = openapi_document(routes)
    add_routes(app, routes)
    app.cleanup_ctx.append(_stream_hubs)
    app.on_shutdown.append(_on_shutdown)
    return app
