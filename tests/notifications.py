"""A raw LISTEN connection that records notifications, for asserting exactly what triggers send."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import asyncpg


@dataclass(frozen=True)
class Received:
    channel: str
    payload: str

    def json(self) -> Any:
        return json.loads(self.payload)


class NotificationRecorder:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.queue: asyncio.Queue[Received] = asyncio.Queue()

    async def listen(self, *channels: str) -> None:
        for channel in channels:
            await self._conn.add_listener(channel, self._on_notification)

    def _on_notification(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        self.queue.put_nowait(Received(channel, str(payload)))

    async def next(self, timeout_s: float = 5.0) -> Received:
        async with asyncio.timeout(timeout_s):
            return await self.queue.get()

    async def drain_after_barrier(self, writer: asyncpg.Connection) -> list[Received]:
        """Everything received up to now, exactly. A barrier notification committed after the
        changes under test arrives after all of theirs (NOTIFY delivers in commit order), so
        when it shows up nothing else can still be in flight."""
        await self._conn.add_listener("test_barrier", self._on_notification)
        await writer.execute("SELECT pg_notify('test_barrier', 'done')")
        received: list[Received] = []
        while True:
            item = await self.next()
            if item.channel == "test_barrier":
                return received
            received.append(item)
