"""The stream hubs: per replica, ONE hub per chat that has local watchers (docs/api.md,
"Streams"), and `StreamHubs`, the replica's set of them with the per-user stream slots.

A hub subscribes to `chat:<id>` on the listener. Notifications only set "what to re-read" flags;
the hub's loop then makes ONE read for everything that accumulated, whatever the number of local
clients, and fans the resulting frames out to every client's bounded queue (app/stream/
subscriber.py). Frames are encoded once and shared by all clients. The reads of all the hubs
that need one at the same moment share ONE statement (app/stream/reader.py).

Joining is serialized with the live reads: a new client is handed to the hub's loop, whose next
read (after the subscription is armed) also reads the client's snapshot from the client's own
cursor, as another request of the same statement (one snapshot of the database). Every later
read is newer than that snapshot, so "drop what the snapshot already covered" holds by
construction, for the queue and the status as much as for messages and parts. Clients that join
together from the same cursor share one request.

The hub's own position never comes from a client: its first read is of the chat's state alone
(newest message, newest live part of the step in progress, status, queue), and it goes on from
there. A cursor, hostile or from the future, only ever bounds what its own client gets.

Snapshots are paged: a read returns at most `ReadPolicy.page_messages` messages and about
`page_bytes` of content (`more_messages` when it left some out; the step's parts, the status and
the queue come with the last page). A client given a page that is not the last one is "catching
up": it gets no live frames, and its next page is read (again with the hub's own read) once its
writer has taken every frame of the previous one. Its last page joins it to the live clients. If
the hub's own read in that statement was itself a page (the hub fell behind by more than a page,
which takes a burst of large messages), the client's last page is read again with the hub's next.

Hubs without clients are stopped and forgotten, which also UNLISTENs their channel.

Failures. Every read has a deadline (`ReadPolicy.deadline_s`). A read that fails because the
database is out or contended (`app.db.failures.is_transient`, which counts a missed deadline as
an outage) is retried with backoff while the clients stay connected (their writers keep sending
keep-alives); after `give_up_after_s` of failures, or at once on any other error (a bug), the
hub fails and its clients get a final `unavailable` frame with their cursor. A listener resync
re-reads everything."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import asyncpg
import orjson

from app.db.failures import classify_db_error, is_transient
from app.db.listener import Event, Listener, Resync
from app.errors import LimitReached
from app.log import get_logger
from app.stream.position import ChatRead, Position, advance
from app.stream.protocol import MAX_ID, StreamCursor, notice_frame
from app.stream.reader import ReadPolicy, ReadRequest, StreamReader
from app.stream.subscriber import StreamClient

log = get_logger(__name__)


@dataclass
class HubCounters:
    reads: int = 0  # reads of this hub (each one row of a `stream_read` statement)
    notifications: int = 0  # notices received on the chat's channel
    resyncs: int = 0  # listener resyncs (reconnect, subscription overflow)
    overflows: int = 0  # clients dropped because they fell behind
    read_failures: int = 0  # reads that failed and were retried (an outage or contention)


class ChatStreamHub:
    """The watchers of one chat on this replica (see the module docstring)."""

    def __init__(
        self,
        chat_id: uuid.UUID,
        pool: asyncpg.Pool,
        listener: Listener,
        *,
        on_failed: Callable[[ChatStreamHub], None],
        reader: StreamReader | None = None,
    ) -> None:
        self.chat_id = chat_id
        self.channel = f"chat:{chat_id}"
        self._cid = str(chat_id)  # made once: every read's events carry it
        self.clients: set[StreamClient] = set()
        self.counters = HubCounters()
        self.finished = False
        self._reader = reader if reader is not None else StreamReader(pool)
        self._listener = listener
        self._on_failed = on_failed
        self._joiners: list[StreamClient] = []  # waiting for their first snapshot page
        self._in_flight: list[StreamClient] = []  # joiners whose first page is being read
        self._catching_up: list[StreamClient] = []  # given a page; more to come
        self._position: Position | None = None
        self._want_history = False
        self._want_queue = False
        self._want_chat = False
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._final_notice: tuple[str, str] | None = None
        self._failing_since: float | None = None
        self._retry_delay_s = 0.0

    @property
    def idle(self) -> bool:
        return self.watchers == 0

    @property
    def watchers(self) -> int:
        """Clients served, catching up, waiting for their snapshot, or whose snapshot is being
        read."""
        in_flight = sum(not client.left for client in self._in_flight)
        return len(self.clients) + len(self._joiners) + len(self._catching_up) + in_flight

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"stream-hub:{self.chat_id}")

    async def stop(self) -> None:
        task = self._task
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            log.error("stream.hub_stop_failed", chat_id=self.chat_id, error=repr(task.exception()))

    def join(self, client: StreamClient) -> None:
        client.on_drained = self._dirty.set
        self._joiners.append(client)
        self._dirty.set()

    def leave(self, client: StreamClient) -> None:
        client.left = True  # it may be in the read in flight: it must not join after it
        self.clients.discard(client)
        with contextlib.suppress(ValueError):
            self._joiners.remove(client)
        with contextlib.suppress(ValueError):
            self._catching_up.remove(client)

    def close_all(self, kind: str, message: str) -> None:
        """Every client gets a final notice after what it has queued; so does every client
        whose snapshot is being read right now, once it has it."""
        self._final_notice = (kind, message)
        for client in [*self.clients, *self._joiners, *self._in_flight, *self._catching_up]:
            client.finish(notice_frame(self.chat_id, client.tail_cursor(), kind, message))

    async def _run(self) -> None:
        try:
            # Armed once subscribed: from here on every commit to this chat reaches _on_event,
            # so the first read (the snapshot of the first clients) misses nothing after it.
            async with self._listener.subscribe(self.channel, handler=self._on_event):
                await self._serve()  # returns when the chat is gone: nothing more to stream
        except Exception as exc:
            # A per-chat hub failing must not take the replica down: its clients are told to
            # reconnect (which builds a new hub) and the failure is logged loudly.
            log.error("stream.hub_failed", chat_id=self.chat_id, error=repr(exc), exc_info=True)
            self.close_all("unavailable", "the stream failed on this replica; reconnect")
            self._on_failed(self)
        finally:
            self.finished = True

    def _on_event(self, event: Event) -> None:
        """Turn a notification into "what to re-read" flags; the loop reads once for all. Called
        by the listener as the notification arrives (no queue, no task of its own: a wake-up
        less per notification)."""
        if isinstance(event, Resync):
            self.counters.resyncs += 1
            self._want_history = self._want_queue = True
        else:
            self.counters.notifications += 1
            self._note(event.payload)
        self._dirty.set()

    def _note(self, payload: str) -> None:
        try:
            # orjson itself, not `loads`: the notices are our triggers' (their ids and
            # generations are bigints, which orjson reads exactly), and `loads`'s guard against
            # longer integers (a regex over the text) cost four times the parse, per
            # notification.
            notice = orjson.loads(payload)
            kind = notice["type"]
            newest_id = int(notice.get("part_id") or notice.get("message_id") or MAX_ID)
        except (ValueError, TypeError, KeyError, AttributeError):
            self._want_history = self._want_queue = True
            return
        position = self._position
        if kind == "parts":
            # Already read by an earlier (batched) read: nothing new to fetch.
            if position is None or newest_id > position.part_id:
                self._want_history = True
        elif kind == "message":
            if position is None or newest_id > position.message_id:
                self._want_history = True
        elif kind == "history_reset":
            self._want_history = True
        elif kind == "queue":
            self._want_queue = True
        elif kind == "chat":
            # Heartbeats and interrupt marks change the row but nothing a stream shows; a new
            # status or generation may also have ended or voided the step in progress.
            if (
                position is None
                or notice.get("status") != position.status
                or notice.get("generation") != position.generation
            ):
                self._want_history = True
        elif kind == "deleted":
            self._want_chat = True
        else:
            self._want_history = self._want_queue = True

    async def _serve(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            # One step per wake-up, in its own frame: nothing it read outlives it while the hub
            # waits (a hub holds only its position between reads).
            if not await self._step():
                return

    async def _step(self) -> bool:
        """Read what is due and deliver it; False when the chat is gone."""
        joiners, self._joiners = self._joiners, []
        snapshots = joiners
        if self._catching_up:
            # A client catching up gets its next page once it has taken the previous one.
            self._catching_up = [client for client in self._catching_up if not client.closed]
            snapshots = joiners + [client for client in self._catching_up if client.queued == 0]
        history = self._want_history or bool(snapshots)
        queue = self._want_queue or bool(snapshots)
        chat = self._want_chat
        self._want_history = self._want_queue = self._want_chat = False
        if not (history or queue or chat) or (self._position is None and not snapshots):
            return True  # nothing to read, or nobody to read it for
        self._in_flight = joiners
        try:
            requests, groups = self._requests(snapshots, history=history, queue=queue)
            # Within 2 x deadline_s (StreamReader). The usual live read awaits its future
            # directly: no gathering, no coroutine layers resumed per read.
            if groups:
                reads = await self._reader.read_many(requests)
            else:
                reads = [await self._reader.submit(requests[0])]
        except Exception as exc:
            # Nothing was read: everything asked for is still to be read, after a pause.
            self._joiners[:0] = [client for client in joiners if not client.left]
            self._want_history |= history
            self._want_queue |= queue
            self._want_chat |= chat
            self._in_flight = []
            await self._back_off(exc)  # raises when it is a bug or lasted too long
            self._dirty.set()
            return True
        finally:
            self._in_flight = []
        self._failing_since = None
        hub_read = reads[0]
        alive = self._advance_hub(hub_read)
        for clients, read in zip(groups, reads[1:], strict=True):
            for client in clients:
                self._serve_snapshot(client, read, hub_caught_up=not hub_read.more_messages)
        if alive and self._catching_up and any(c.queued == 0 for c in self._catching_up):
            self._dirty.set()  # a page that gave no frames: the next one at once
        return alive

    def _advance_hub(self, read: ChatRead) -> bool:
        """Take the hub's position to `read` and hand the frames to its live clients; False
        when the chat is gone (every client has been told)."""
        if self._position is None:
            if read.exists:
                self._position = Position.of_state(read)
            return read.exists
        frames = advance(read, self._position)
        if frames:
            for client in list(self.clients):
                if not client.push(frames):
                    self.counters.overflows += 1
                    self.clients.discard(client)
                    log.info("stream.client_overflow", chat_id=self.chat_id)
        if not read.exists:
            for client in self._catching_up:
                client.finish(frames[-1])
            self._catching_up = []
            return False
        if read.more_messages:
            # The hub itself fell a page behind: read the next one, and with it what this page
            # left for the last one (the step, the status, the queue).
            self._want_history = self._want_queue = True
            self._dirty.set()
        return True

    def _serve_snapshot(self, client: StreamClient, read: ChatRead, *, hub_caught_up: bool) -> None:
        """Hand a client its snapshot page. Its last page joins it to the live clients: the
        hub read the same statement, so every later live frame is newer than that page."""
        with contextlib.suppress(ValueError):
            self._catching_up.remove(client)
        if client.left:
            return
        if not read.more_messages and read.exists and not hub_caught_up:
            # The client would be up to date but the hub is not (it fell a page behind):
            # live frames would repeat what this page has. Read it again with the hub's next.
            self._catching_up.append(client)
            return
        client.push_snapshot(advance(read, client.position), more=read.more_messages)
        if self._final_notice is not None:
            kind, message = self._final_notice
            client.finish(notice_frame(self.chat_id, client.tail_cursor(), kind, message))
        if client.closed:
            return
        if read.more_messages:
            self._catching_up.append(client)
        else:
            self.clients.add(client)

    async def _back_off(self, exc: Exception) -> None:
        """After a failed read: wait before the next try when the database is out or
        contended; re-raise when it is a bug or has lasted `give_up_after_s`."""
        policy = self._reader.policy
        if not is_transient(exc):
            raise exc
        now = asyncio.get_running_loop().time()
        if self._failing_since is None:
            self._failing_since = now
            self._retry_delay_s = policy.retry_initial_s
        elif now - self._failing_since >= policy.give_up_after_s:
            raise exc
        self.counters.read_failures += 1
        log.warning(
            "stream.hub_read_failed",
            chat_id=self.chat_id,
            error=repr(exc),
            failure=classify_db_error(exc),
            retry_in_s=self._retry_delay_s,
        )
        await asyncio.sleep(self._retry_delay_s)
        self._retry_delay_s = min(self._retry_delay_s * 2, policy.retry_max_s)

    def _requests(
        self, snapshots: list[StreamClient], *, history: bool, queue: bool
    ) -> tuple[list[ReadRequest], list[list[StreamClient]]]:
        """The hub's own request and those of the snapshot pages of `snapshots` (one per
        distinct cursor, with the clients it serves), for one statement. Each position is read
        from its own cursor: a cursor only ever bounds what its own client gets."""
        self.counters.reads += 1
        position = self._position
        if position is None:
            # The hub's first read: only the chat's state, which becomes its position.
            own = ReadRequest(
                self.chat_id, True, MAX_ID, MAX_ID, True, [], state=True, cid=self._cid
            )
        else:
            own = ReadRequest(
                chat_id=self.chat_id,
                history=history,
                after_message_id=position.message_id,
                from_part_id=position.part_id,
                queue=queue,
                # A tuple: a tuple of numbers is untracked by the cyclic GC after its first pass.
                message_cursors=(position.message_id,) if position.message_id > 0 else (),
                cid=self._cid,
            )
        if not snapshots:
            return [own], []
        by_cursor: dict[tuple[int, int], list[StreamClient]] = {}
        for client in snapshots:
            by_cursor.setdefault((client.position.message_id, client.position.part_id), []).append(
                client
            )
        requests = [own] + [
            ReadRequest(
                chat_id=self.chat_id,
                history=True,
                after_message_id=message_id,
                from_part_id=part_id,
                queue=True,
                message_cursors=[message_id] if message_id > 0 else [],
                state=True,
                cid=self._cid,
            )
            for message_id, part_id in by_cursor
        ]
        return requests, list(by_cursor.values())


@dataclass(frozen=True)
class StreamStats:
    hubs: int
    clients: int
    reads: int  # hub reads (one per batch of notifications of one chat)
    notifications: int
    resyncs: int
    overflows: int
    statements: int = 0  # the `stream_read` statements that served them (shared by hubs)
    read_failures: int = 0  # hub reads that failed and were retried


class StreamSlots:
    """Open stream connections per user on this replica (`max_streams_per_user`): one user
    cannot take every connection, hub and byte of a replica."""

    def __init__(self) -> None:
        self._open: dict[uuid.UUID, int] = {}

    def open(self, user_id: uuid.UUID) -> int:
        return self._open.get(user_id, 0)

    @contextlib.contextmanager
    def hold(self, user_id: uuid.UUID, maximum: int) -> Iterator[None]:
        """One stream of `user_id` while inside; LimitReached when it has `maximum` open."""
        count = self._open.get(user_id, 0)
        if count >= maximum:
            raise LimitReached(
                limit="streams_per_user",
                maximum=maximum,
                message="too many open streams for this user; close one first",
            )
        self._open[user_id] = count + 1
        try:
            yield
        finally:
            left = self._open[user_id] - 1
            if left:
                self._open[user_id] = left
            else:
                del self._open[user_id]


class StreamHubs:
    """The registry of this replica's hubs: created on the first watcher of a chat, stopped and
    forgotten when its last watcher leaves. Counters of reclaimed hubs are kept in the totals."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        listener: Listener,
        *,
        max_queued_events_per_client: int,
        policy: ReadPolicy | None = None,
    ) -> None:
        self._pool = pool
        self._listener = listener
        self._max_queued = max_queued_events_per_client
        self._hubs: dict[uuid.UUID, ChatStreamHub] = {}
        self._reader = StreamReader(pool, policy=policy)
        self._retired = HubCounters()
        self._closing = False
        self.slots = StreamSlots()

    @property
    def policy(self) -> ReadPolicy:
        return self._reader.policy

    @policy.setter
    def policy(self, policy: ReadPolicy) -> None:
        self._reader.policy = policy

    def hub(self, chat_id: uuid.UUID) -> ChatStreamHub | None:
        return self._hubs.get(chat_id)

    def stats(self) -> StreamStats:
        hubs = list(self._hubs.values())
        return StreamStats(
            hubs=len(hubs),
            clients=sum(hub.watchers for hub in hubs),
            reads=self._retired.reads + sum(hub.counters.reads for hub in hubs),
            notifications=self._retired.notifications
            + sum(hub.counters.notifications for hub in hubs),
            resyncs=self._retired.resyncs + sum(hub.counters.resyncs for hub in hubs),
            overflows=self._retired.overflows + sum(hub.counters.overflows for hub in hubs),
            statements=self._reader.statements,
            read_failures=self._retired.read_failures
            + sum(hub.counters.read_failures for hub in hubs),
        )

    @contextlib.asynccontextmanager
    async def watch(self, chat_id: uuid.UUID, cursor: StreamCursor) -> AsyncIterator[StreamClient]:
        """Join the chat's hub (creating it); the client's queue starts with its snapshot."""
        client = StreamClient(chat_id, cursor, self._max_queued)
        if self._closing:
            client.finish(
                notice_frame(chat_id, cursor, "shutdown", "the server is shutting down; reconnect")
            )
            yield client
            return
        hub = self._hubs.get(chat_id)
        if hub is None or hub.finished:
            hub = ChatStreamHub(
                chat_id, self._pool, self._listener, on_failed=self._forget, reader=self._reader
            )
            self._hubs[chat_id] = hub
            hub.start()
        hub.join(client)
        try:
            yield client
        finally:
            hub.leave(client)
            if hub.idle:
                self._forget(hub)
                await hub.stop()

    def _forget(self, hub: ChatStreamHub) -> None:
        if self._hubs.get(hub.chat_id) is hub:
            del self._hubs[hub.chat_id]
            self._retired.reads += hub.counters.reads
            self._retired.notifications += hub.counters.notifications
            self._retired.overflows += hub.counters.overflows
            self._retired.resyncs += hub.counters.resyncs
            self._retired.read_failures += hub.counters.read_failures

    def close_all(self) -> None:
        """Shutdown: every client gets a final `shutdown` frame after what it has queued."""
        self._closing = True
        for hub in list(self._hubs.values()):
            hub.close_all("shutdown", "the server is shutting down; reconnect")

    async def aclose(self) -> None:
        self.close_all()
        hubs = list(self._hubs.values())
        for hub in hubs:
            self._forget(hub)
        for hub in hubs:
            await hub.stop()
        await self._reader.aclose()
