"""The aiohttp application: the declared routes (app/http/routes.py), one error middleware,
the stream hubs opened and closed in cleanup_ctx, and streams told to end on shutdown
(WebSockets with GOING_AWAY)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Sequence

import asyncpg
from aiohttp import WSCloseCode, web

from app.config import Settings
from app.db.listener import Listener
from app.http import keys
from app.http.error_middleware import error_middleware
from app.http.keys import METRICS, OPENAPI
from app.http.openapi import openapi_document
from app.http.routes import all_routes
from app.http.routing import add_routes
from app.metrics import Collector, listener_metrics, pool_metrics, stream_metrics
from app.stream.hub import StreamHubs


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
    server_tool_names: Callable[[], Collection[str]] = frozenset,
) -> web.Application:
    """`server_tool_names`: the names of the replica's server-side tools, which client tool
    definitions may not take (none by default: an API without a worker)."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[keys.SERVER_TOOL_NAMES] = server_tool_names
    app[keys.SETTINGS] = settings
    app[keys.POOL] = pool
    app[keys.LISTENER] = listener
    app[keys.WEBSOCKETS] = set()
    app[keys.SHUTDOWN] = asyncio.Event()
    app[METRICS] = [listener_metrics(listener), pool_metrics(pool), *metrics]
    routes = all_routes()
    app[OPENAPI] = openapi_document(routes)
    add_routes(app, routes)
    app.cleanup_ctx.append(_stream_hubs)
    app.on_shutdown.append(_on_shutdown)
    return app
