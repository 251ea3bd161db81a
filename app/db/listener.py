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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from app.aio import wait_event
from app.db.connections import connect
from app.db.failures import is_outage
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
    memory stays bounded and nothing is silently lost.

    Or, with a `handler`, no queue: each event is handed to it as it arrives, from the
    listener's connection callback. For subscribers that only note what to re-read (the stream
    hubs): no task to wake per notification. A handler must be quick and must not raise (one
    that does is logged and the subscriber resynced)."""

    def __init__(
        self, channel: str, max_queued: int, handler: Callable[[Event], None] | None = None
    ) -> None:
        self.channel = channel
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=max_queued)
        self._handler = handler
        self.overflows = 0

    def deliver(self, event: Event) -> None:
        handler = self._handler
        if handler is not None:
            try:
                handler(event)
            except Exception as exc:
                log.error(
                    "listener.handler_failed", channel=self.channel, error=repr(exc), exc_info=True
                )
                with contextlib.suppress(Exception):
                    handler(Resync("overflow"))
            return
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
    listens: int = 0  # channels LISTENed (a channel's first subscriber)
    unlistens: int = 0  # channels UNLISTENed (its last subscriber left)
    commands: int = 0  # round trips that carried them (several channels each under load)


# Channels per LISTEN/UNLISTEN round trip (a simple query of `LISTEN "…";` statements, ~50
# bytes each).
MAX_CHANNELS_PER_COMMAND = 500


def quote_channel(channel: str) -> str:
    """A channel name as an SQL identifier."""
    return '"' + channel.replace('"', '""') + '"'


class _ListenConnection(asyncpg.Connection):
    """The listener's connection hands every notification straight to the listener.

    asyncpg's `add_listener` costs one prepared statement and up to two round trips per channel,
    and the statement cache then churns through one-off `LISTEN "chat:<id>"` statements. The
    listener instead sends plain `LISTEN`/`UNLISTEN` commands, many channels per round trip,
    and takes the notifications from asyncpg's dispatch hook (`_process_notification`, called
    by the protocol for every NotificationResponse), filtering by channel itself."""

    __slots__ = ("_chatd_dispatch",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chatd_dispatch: Callable[[str, str], None] | None = None

    def _process_notification(self, pid: int, channel: str, payload: Any) -> None:
        dispatch = self._chatd_dispatch
        if dispatch is not None:
            dispatch(channel, str(payload))


class Listener:
    """Run `run()` as a long-lived task; `subscribe()` from anywhere in the same event loop.

    Only the `run()` task talks to the connection: it connects, applies the channel set (LISTEN
    what has subscribers, UNLISTEN what has none any more) in batched commands whenever asked,
    and sends the keepalive. `subscribe()` asks for the channel and waits until a command has
    armed it; leaving waits until the channel is disarmed. Subscribers that arrive while a
    command is in flight share the next one, so a burst of runs or stream hubs costs a few
    round trips, not one per channel."""

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
        self._conn: _ListenConnection | None = None
        self._listening: set[str] = set()  # channels LISTENed on the current connection
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._attention = asyncio.Event()  # the run task: connection lost or channels to apply
        self._next_apply: asyncio.Future[None] | None = None  # resolved by the next apply
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
    async def subscribe(
        self, channel: str, handler: Callable[[Event], None] | None = None
    ) -> AsyncIterator[Subscription]:
        """A subscription to `channel`, armed when it is returned; with `handler`, events go to
        it as they arrive instead of to the subscription's queue (see Subscription)."""
        subscription = Subscription(channel, self._max_queued, handler)
        self._subscribers.setdefault(channel, set()).add(subscription)
        try:
            await self._applied(channel)
            yield subscription
        finally:
            subscribers = self._subscribers.get(channel)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscribers[channel]
                    await self._applied(channel)

    async def _applied(self, channel: str) -> None:
        """Wait until the connection LISTENs on `channel` exactly while it has subscribers.
        Returns at once when disconnected: the connect that follows LISTENs on every channel
        with subscribers and resyncs them."""
        while self._conn is not None and (channel in self._subscribers) != (
            channel in self._listening
        ):
            if self._next_apply is None or self._next_apply.done():
                self._next_apply = asyncio.get_running_loop().create_future()
            applied = self._next_apply
            self._attention.set()
            # Shielded: a subscriber that is cancelled meanwhile must not cancel the command
            # the others share (the run task owns it).
            await asyncio.shield(applied)

    async def run(self) -> None:
        """Connect, LISTEN, deliver; on any loss reconnect with capped, jittered backoff."""
        backoff_s = self._backoff_initial_s
        while True:
            try:
                await self._connect()
                backoff_s = self._backoff_initial_s
                await self._serve_connection()
            except (Exception, asyncio.CancelledError) as exc:
                await self._drop_connection()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if not is_outage(exc):
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
        conn = await connect(self._dsn, connection_class=_ListenConnection)
        assert isinstance(conn, _ListenConnection)
        self._lost.clear()
        conn.add_termination_listener(self._on_terminated)
        conn._chatd_dispatch = self._on_notification
        self._conn = conn
        self._listening = set()
        await self._apply(conn)
        self._connected.set()
        self.stats.connects += 1
        log.info(
            "listener.connected", backend_pid=conn.get_server_pid(), channels=len(self._listening)
        )
        # Whatever happened while we were not listening is unknown: everyone re-reads.
        for subscribers in list(self._subscribers.values()):
            for subscription in list(subscribers):
                subscription.deliver(Resync("connected"))

    def _on_terminated(self, _conn: object) -> None:
        self._lost.set()
        self._attention.set()

    async def _serve_connection(self) -> None:
        """Apply channel changes as they are asked for; return when the connection is gone. A
        keepalive catches half-open connections that the termination callback never reports."""
        conn = self._conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        next_keepalive = loop.time() + self._keepalive_interval_s
        while not self._lost.is_set():
            await wait_event(self._attention, next_keepalive - loop.time())
            self._attention.clear()
            if self._lost.is_set():
                return
            if self._next_apply is not None:
                await self._apply(conn)
            elif loop.time() >= next_keepalive:
                await conn.fetchval("SELECT 1", timeout=self._keepalive_timeout_s)
                next_keepalive = loop.time() + self._keepalive_interval_s

    async def _apply(self, conn: _ListenConnection) -> None:
        """LISTEN on every channel with subscribers, UNLISTEN the others: batched commands
        (simple queries, several statements each). Resolves the subscribers waiting for it."""
        waiting, self._next_apply = self._next_apply, None
        try:
            while True:
                wanted = self._subscribers.keys()
                to_listen = [c for c in wanted if c not in self._listening]
                to_unlisten = [c for c in self._listening if c not in wanted]
                if not to_listen and not to_unlisten:
                    return
                to_listen = to_listen[:MAX_CHANNELS_PER_COMMAND]
                to_unlisten = to_unlisten[: MAX_CHANNELS_PER_COMMAND - len(to_listen)]
                command = [f"LISTEN {quote_channel(c)};" for c in to_listen]
                command += [f"UNLISTEN {quote_channel(c)};" for c in to_unlisten]
                await conn.execute("\n".join(command), timeout=self._keepalive_timeout_s)
                self.stats.commands += 1
                self.stats.listens += len(to_listen)
                self.stats.unlistens += len(to_unlisten)
                self._listening.update(to_listen)
                self._listening.difference_update(to_unlisten)
        finally:
            if waiting is not None and not waiting.done():
                waiting.set_result(None)

    async def _drop_connection(self) -> None:
        self._connected.clear()
        conn, self._conn = self._conn, None
        self._listening = set()
        waiting, self._next_apply = self._next_apply, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)  # they return: the next connect arms them and resyncs
        if conn is not None:
            conn._chatd_dispatch = None
            conn.terminate()

    def _on_notification(self, channel: str, payload: str) -> None:
        self.stats.notifications += 1
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        notice = Notice(channel, payload)  # immutable: one for every subscriber
        for subscription in list(subscribers):
            subscription.deliver(notice)
