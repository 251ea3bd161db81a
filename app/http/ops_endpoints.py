"""The operations routes' handlers: liveness, readiness, `/metrics` and the OpenAPI document."""

from __future__ import annotations

import asyncio

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from app.http.keys import METRICS, OPENAPI
from app.http.routing import Call, json_response
from app.log import get_logger
from app.metrics import Collector, render, requires_action_metrics
from app.state import chats

log = get_logger(__name__)


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


# Bound of the one database read of a scrape: /metrics must answer while the database is away.
METRICS_QUERY_TIMEOUT_S = 2.0


async def metrics(call: Call) -> web.StreamResponse:
    collectors: list[Collector] = [*call.request.app[METRICS]]
    try:
        async with asyncio.timeout(METRICS_QUERY_TIMEOUT_S):
            waiting = await chats.count_requiring_action(call.pool)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        # The sample is left out of this scrape; every other metric still answers.
        log.warning("http.metrics_query_failed", error=repr(exc))
    else:
        collectors.append(requires_action_metrics(waiting))
    return web.Response(
        body=render(collectors),
        headers={"Content-Type": CONTENT_TYPE_LATEST, "X-Content-Type-Options": "nosniff"},
    )


async def openapi(call: Call) -> web.StreamResponse:
    return json_response(call.request.app[OPENAPI])
