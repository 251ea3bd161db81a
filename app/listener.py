"""The listener: one dedicated LISTEN connection per replica (never from the pool), multiplexing
notification channels to in-process subscribers.

A notification is a hint; the tables are the truth. Whenever the listener cannot vouch that a
subscriber saw every notification (the connection was lost and re-established, or the
subscriber's bounded queue overflowed), the subscriber receives a `Resync` and must re-read the
tables. Subscribers are armed (LISTEN executed) before `subscribe()` returns when the connection
is up; when it is down, the `Resync` after the reconnect covers the gap.

This connection must reach Postgres directly or through a session-pooling proxy: LISTEN state
lives in a server session, which a transaction-pooling PgBouncer does not keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import asyncpg

from app.db import Conn, is_connection_error
from app.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Notice:
    channel: str
    payload: str


@dataclass(frozen=True)
class Resync:
    reason: Literal["connected", "overflow"]


Event = Notice | Resync


class Subscription:
    """A bounded queue of events for one channel. On overflow the queue is emptied and replaced
    by a single `Resync("overflow")`: re-reading the tables supersedes everything dropped, so
    memory stays bounded and nothing is silently lost."""

    def __init__(self, channel: str, max_queued: int) -> None:
        self.channel = channel
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=max_queued)
        self.overflows = 0

    def deliver(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflows += 1
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(Resync("overflow"))

    async def get(self) -> Event:
        return await self._queue.get()

    def get_nowait(self) -> Event | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            yield await self._queue.get()


@dataclass
class ListenerStats:
    connects: int = 0
    notifications: int = 0
    connection_losses: int = 0


class Listener:
    """Run `run()` as a long-lived task; `subscribe()` from anywhere in the same event loop."""

    def __init__(
        self,
        dsn: str,
        *,
        keepalive_interval_s: float = 5.0,
        keepalive_timeout_s: float = 5.0,
        reconnect_backoff_initial_s: float = 0.05,
        reconnect_backoff_max_s: float = 2.0,
        max_queued_per_subscriber: int = 1000,
    ) -> None:
        self._dsn = dsn
        self._keepalive_interval_s = keepalive_interval_s
        self._keepalive_timeout_s = keepalive_timeout_s
        self._backoff_initial_s = reconnect_backoff_initial_s
        self._backoff_max_s = reconnect_backoff_max_s
        self._max_queued = max_queued_per_subscriber
        self._subscribers: dict[str, set[Subscription]] = {}
        self._conn: asyncpg.Connection | None = None
        self._listening: set[str] = set()  # channels LISTENed on the current connection
        self._conn_lock = asyncio.Lock()  # asyncpg runs one command at a time per connection
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self.stats = ListenerStats()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def backend_pid(self) -> int | None:
        conn = self._conn
        return conn.get_server_pid() if conn is not None and self.connected else None

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        subscription = Subscription(channel, self._max_queued)
        self._subscribers.setdefault(channel, set()).add(subscription)
        try:
            await self._listen(channel)
            yield subscription
        finally:
            subscribers = self._subscribers.get(channel)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscribers[channel]
                    await asyncio.shield(self._unlisten(channel))

    async def run(self) -> None:
        """Connect, LISTEN, deliver; on any loss reconnect with capped, jittered backoff."""
        backoff_s = self._backoff_initial_s
        while True:
            try:
                await self._connect()
                backoff_s = self._backoff_initial_s
                await self._watch_connection()
            except (Exception, asyncio.CancelledError) as exc:
                await self._drop_connection()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if not is_connection_error(exc) and not isinstance(exc, TimeoutError):
                    raise
                self.stats.connection_losses += 1
                log.warning("listener.connection_lost", error=repr(exc), retry_in_s=backoff_s)
            else:
                await self._drop_connection()
                self.stats.connection_losses += 1
                log.warning("listener.connection_lost", error="terminated", retry_in_s=backoff_s)
            await asyncio.sleep(backoff_s * random.uniform(0.5, 1.0))
            backoff_s = min(backoff_s * 2, self._backoff_max_s)

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        self._lost.clear()
        conn.add_termination_listener(lambda _conn: self._lost.set())
        async with self._conn_lock:
            self._conn = conn
            self._listening = set()
            for channel in list(self._subscribers):
                await conn.add_listener(channel, self._on_notification)
                self._listening.add(channel)
        self._connected.set()
        self.stats.connects += 1
        log.info(
            "listener.connected", backend_pid=conn.get_server_pid(), channels=len(self._listening)
        )
        # Whatever happened while we were not listening is unknown: everyone re-reads.
        for subscribers in list(self._subscribers.values()):
            for subscription in list(subscribers):
                subscription.deliver(Resync("connected"))

    async def _watch_connection(self) -> None:
        """Return when the connection is gone; a keepalive catches half-open connections that
        the termination callback never reports."""
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._keepalive_interval_s):
                    await self._lost.wait()
                    return
            async with self._conn_lock:
                conn = self._conn
                assert conn is not None
                await conn.fetchval("SELECT 1", timeout=self._keepalive_timeout_s)

    async def _drop_connection(self) -> None:
        self._connected.clear()
        conn, self._conn = self._conn, None
        self._listening = set()
        if conn is not None:
            conn.terminate()

    async def _listen(self, channel: str) -> None:
        async with self._conn_lock:
            conn = self._conn
            if conn is None or channel in self._listening:
                return
            try:
                await conn.add_listener(channel, self._on_notification)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                # The run loop will reconnect, LISTEN again and resync this subscriber.
                self._lost.set()
                return
            self._listening.add(channel)

    async def _unlisten(self, channel: str) -> None:
        async with self._conn_lock:
            conn = self._conn
            if conn is None or channel not in self._listening or channel in self._subscribers:
                return
            self._listening.discard(channel)
            try:
                await conn.remove_listener(channel, self._on_notification)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                self._lost.set()

    def _on_notification(self, _conn: Conn, _pid: int, channel: str, payload: object) -> None:
        self.stats.notifications += 1
        for subscription in list(self._subscribers.get(channel, ())):
            subscription.deliver(Notice(channel, str(payload)))
