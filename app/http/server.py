"""The aiohttp application. Resources are opened and closed in cleanup_ctx, in reverse order."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from app.config import Settings
from app.listener import Listener

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
LISTENER = web.AppKey("listener", Listener)


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the database answers and the listener is connected."""
    pool = request.app[POOL]
    listener = request.app[LISTENER]
    try:
        await pool.fetchval("SELECT 1", timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return web.json_response(
            {"status": "unavailable", "message": "database unreachable", "detail": repr(exc)},
            status=503,
        )
    if not listener.connected:
        return web.json_response(
            {"status": "unavailable", "message": "listener not connected"}, status=503
        )
    return web.json_response({"status": "ok"})


def build_app(*, settings: Settings, pool: asyncpg.Pool, listener: Listener) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[POOL] = pool
    app[LISTENER] = listener
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
