"""Typed application keys: the resources every handler reaches through `request.app`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any

import asyncpg
from aiohttp import web

from app.config import Settings
from app.db.listener import Listener
from app.metrics import Collector
from app.stream.hub import StreamHubs

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
LISTENER = web.AppKey("listener", Listener)
STREAM_HUBS = web.AppKey("stream_hubs", StreamHubs)
# Open WebSockets, closed with GOING_AWAY on shutdown (each handler removes its own).
WEBSOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("websockets")
# Set when the application shuts down: long-lived handlers (the chat-list watch) end.
SHUTDOWN = web.AppKey("shutdown", asyncio.Event)
# The OpenAPI document, built once from the route declarations.
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")
# What `/metrics` collects (app/metrics.py).
METRICS: web.AppKey[list[Collector]] = web.AppKey("metrics")
# The names of the server-side tools (the replica's registry): a chat's client tools may not
# take them. A callable, so that a source of tools that changes (plug-ins, MCP) is asked anew.
SERVER_TOOL_NAMES: web.AppKey[Callable[[], Collection[str]]] = web.AppKey("server_tool_names")
