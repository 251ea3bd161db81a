"""Typed application keys: the resources every handler reaches through `request.app`."""

from __future__ import annotations

import asyncio

import asyncpg
from aiohttp import web

from app.config import Settings
from app.listener import Listener
from app.streams import StreamHubs

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
LISTENER = web.AppKey("listener", Listener)
STREAM_HUBS = web.AppKey("stream_hubs", StreamHubs)
# Open WebSockets, closed with GOING_AWAY on shutdown (each handler removes its own).
WEBSOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("websockets")
# Set when the application shuts down: long-lived handlers (the chat-list watch) end.
SHUTDOWN = web.AppKey("shutdown", asyncio.Event)
