"""The stream room: per replica, ONE hub per chat that has local watchers (docs/api.md, "Streams").

A hub subscribes to `chat:<id>` on the listener. Notifications only set "what to re-read" flags;
the hub's loop then makes ONE read for everything that accumulated, whatever the number of local
clients, and fans the resulting frames out to every client's bounded queue. Frames are encoded
once and shared by all clients. The reads of all the hubs that need one at the same moment share
ONE statement (`StreamReader`, `streams_read`): a worker's flush notifies every chat it streams at
once, and their hubs here then cost one statement, not one each.

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

Positions. A hub and each joining client have a `Position`: the last message id delivered, the
part high-water mark, whether a step is in progress (parts were delivered since the last
message), the last status/version and queue sent. `advance(read, position)` turns a read into
the frames that take that position to the state of the read; it is pure, and it is the whole
protocol:
  - a message cursor that was soft-deleted since (an edit) -> `history_reset` from the first id
    to drop, then the messages after it;
  - messages after the cursor, in id order (a message ends the step in progress); a cursor
    beyond the chat's newest message moves back to it (nothing to replay);
  - live parts of the chat's current generation after the part cursor, only while the chat is
    `running` (an archived or stopped run's parts are void); a `retry` control part voids the
    parts before it, so a position behind it starts at the last retry;
  - a step the position was following that vanished without a message (its run failed, was
    requeued or re-acquired) -> `history_reset` for the step only (`reason: step_discarded`);
  - the status when it changed (never older than one sent), then `error` when it is `error`;
  - the queue when it changed.

The cursor of an event is `<last message id>:<last part id of the step in progress, or 0>`.
A client that stops reading overflows its queue (`max_queued_events_per_client` live frames):
its queue is dropped and replaced by one final `error` frame of kind `resync`, carrying the
cursor of the last frame it was given, and the connection is closed; memory never grows (a
client holds at most one snapshot page plus that many live frames).
Hubs without clients are stopped and forgotten, which also UNLISTENs their channel.

Failures. Every read has a deadline (`ReadPolicy.deadline_s`). A read that fails because the
database is out or contended (`app.db.is_transient`, which counts a missed deadline as an outage)
is retried with backoff while the clients stay connected (their writers keep sending keep-alives);
after `give_up_after_s` of failures, or at once on any other error (a bug), the hub fails and its
clients get a final `unavailable` frame with their cursor. A listener resync re-reads everything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.aio import wait_event
from app.chats import Message, QueuedMessage
from app.db import classify_db_error, is_transient, project_queries
from app.errors import LimitReached, ValidationFailed
from app.listener import Listener, Notice, Resync, Subscription
from app.log import get_logger

Q = project_queries()
log = get_logger(__name__)

MAX_ID = 2**63 - 1
_CURSOR = re.compile(r"(\d{1,19}):(\d{1,19})")


@dataclass(frozen=True)
class StreamCursor:
    """`<last message id>:<last part id>`; 0 means "none"."""

    message_id: int = 0
    part_id: int = 0

    def __str__(self) -> str:
        return f"{self.message_id}:{self.part_id}"

    @classmethod
    def parse(cls, text: str, *, field: str = "after") -> StreamCursor:
        match = _CURSOR.fullmatch(text.strip())
        if match is None or int(match[1]) > MAX_ID or int(match[2]) > MAX_ID:
            raise ValidationFailed(
                "invalid stream cursor",
                validations=[{"field": field, "detail": "expected <message id>:<part id>"}],
            )
        return cls(int(match[1]), int(match[2]))


class Payload:
    """The JSON data of one event, encoded at most once however many clients receive it."""

    __slots__ = ("_json", "data")

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self._json: str | None = None

    def json(self) -> str:
        if self._json is None:
            self._json = json.dumps(self.data, separators=(",", ":"), ensure_ascii=False)
        return self._json


class Frame:
    """One event as sent: SSE (`id:` cursor, `event:`, `data:`) or a WebSocket text frame (the
    same JSON with a `cursor` field). `final` frames end the connection after they are sent."""

    __slots__ = ("_sse", "_ws", "cursor", "event", "final", "payload")

    def __init__(
        self, event: str, payload: Payload, cursor: StreamCursor | None, *, final: bool = False
    ) -> None:
        self.event = event
        self.payload = payload
        self.cursor = cursor
        self.final = final
        self._sse: bytes | None = None
        self._ws: str | None = None

    @property
    def data(self) -> dict[str, Any]:
        return self.payload.data

    def sse(self) -> bytes:
        if self._sse is None:
            head = f"id: {self.cursor}\n" if self.cursor is not None else ""
            self._sse = f"{head}event: {self.event}\ndata: {self.payload.json()}\n\n".encode()
        return self._sse

    def ws(self) -> str:
        if self._ws is None:
            body = self.payload.json()
            if self.cursor is None:
                self._ws = body
            else:
                # The payload is a JSON object: splice the cursor in without re-encoding it.
                self._ws = f'{{"cursor":"{self.cursor}",{body[1:]}'
        return self._ws


SSE_KEEPALIVE = b": keepalive\n\n"


# --------------------------------------------------------------------------------------------
# Reads and positions: the pure part of the protocol.


@dataclass(frozen=True)
class LivePart:
    id: int
    is_retry: bool
    payload: Payload


@dataclass(frozen=True)
class ChatRead:
    """What one read (a row of `streams_read`) returned, with every payload prepared once."""

    chat_id: uuid.UUID
    exists: bool
    status: str = ""
    version: int = 0
    generation: int = 0
    status_payload: Payload | None = None
    error_payload: Payload | None = None
    error_key: str | None = None
    messages: list[tuple[int, Payload]] | None = None
    parts: list[LivePart] | None = None
    queue_payload: Payload | None = None
    queue_key: str | None = None
    resets: dict[int, int] | None = None
    more_messages: bool = False  # a page: messages after these were left out (and the rest)
    newest_message_id: int | None = None  # the chat's newest visible message (0: none)
    newest_part_id: int = 0  # the newest live part of the step in progress, 0 when none

    @classmethod
    def from_row(cls, chat_id: uuid.UUID, row: asyncpg.Record | None) -> ChatRead:
        if row is None or not row["found"]:
            return cls(chat_id=chat_id, exists=False)
        cid = str(chat_id)
        last_error = json.loads(row["last_error"]) if row["last_error"] is not None else None
        messages = None
        if row["messages"] is not None:
            messages = [
                (
                    record["id"],
                    Payload(
                        {
                            "type": "message",
                            "chat_id": cid,
                            "message": Message.from_record(record).to_json(),
                        }
                    ),
                )
                for record in row["messages"]
            ]
        parts = None
        if row["parts"] is not None:
            parts = [_live_part(cid, record) for record in row["parts"]]
        queue_payload = queue_key = None
        if row["queue"] is not None:
            queued = [QueuedMessage.from_record(record).to_json() for record in row["queue"]]
            queue_payload = Payload({"type": "queue", "chat_id": cid, "queued": queued})
            queue_key = queue_payload.json()
        status = row["status"]
        return cls(
            chat_id=chat_id,
            exists=True,
            status=status,
            version=row["version"],
            generation=row["generation"],
            status_payload=Payload(
                {"type": "status", "chat_id": cid, "status": status, "version": row["version"]}
            ),
            error_payload=_error_payload(cid, last_error) if status == "error" else None,
            error_key=row["last_error"] if status == "error" else None,
            messages=messages,
            parts=parts,
            queue_payload=queue_payload,
            queue_key=queue_key,
            resets={int(k): int(v) for k, v in json.loads(row["resets"]).items()}
            if row["resets"] is not None
            else {},
            more_messages=row["more_messages"],
            newest_message_id=(row["newest_message_id"] or 0) if row["state"] else None,
            newest_part_id=row["newest_part_id"] or 0,
        )


def _live_part(chat_id: str, record: asyncpg.Record) -> LivePart:
    part = json.loads(record["part"])
    if isinstance(part, dict) and part.get("type") == "retry":
        return LivePart(
            id=record["id"],
            is_retry=True,
            payload=Payload(
                {
                    "type": "retry",
                    "chat_id": chat_id,
                    "attempt": part.get("attempt"),
                    "delay_ms": part.get("delay_ms"),
                    "retrying_at": part.get("retrying_at"),
                    "kind": part.get("kind"),
                    "provider": part.get("provider"),
                    "status_code": part.get("status_code"),
                    "error": part.get("error"),
                }
            ),
        )
    return LivePart(
        id=record["id"],
        is_retry=False,
        payload=Payload(
            {
                "type": "message_part",
                "chat_id": chat_id,
                "part_id": record["id"],
                "role": record["message_role"],
                "part": part,
            }
        ),
    )


def error_event(
    chat_id: str,
    *,
    message: str,
    kind: Any,
    retryable: bool,
    provider: Any = None,
    status_code: Any = None,
    detail: Any = None,
) -> Payload:
    """The payload of a stream's `error` event, the one shape every error event has: a chat
    that failed, a deleted chat, and the notices that tell a client to reconnect."""
    return Payload(
        {
            "type": "error",
            "chat_id": chat_id,
            "message": message,
            "kind": kind,
            "provider": provider,
            "retryable": retryable,
            "status_code": status_code,
            "detail": detail,
        }
    )


def _error_payload(chat_id: str, last_error: Any) -> Payload:
    error = last_error if isinstance(last_error, dict) else {}
    return error_event(
        chat_id,
        message=str(error.get("message") or "the chat failed"),
        kind=error.get("kind", "generic"),
        provider=error.get("provider"),
        retryable=bool(error.get("retryable", False)),
        status_code=error.get("status_code"),
        detail=error.get("detail"),
    )


@dataclass
class Position:
    """Where a stream stands. `part_id` is a high-water mark that never goes back; the cursor
    shows it only while a step is in progress, so `m:0` means "no live parts held"."""

    message_id: int = 0
    part_id: int = 0
    in_step: bool = False
    status: str | None = None
    version: int = 0
    generation: int | None = None
    error_key: str | None = None
    queue_key: str | None = None

    @classmethod
    def at(cls, cursor: StreamCursor) -> Position:
        return cls(message_id=cursor.message_id, part_id=cursor.part_id, in_step=cursor.part_id > 0)

    @classmethod
    def of_state(cls, read: ChatRead) -> Position:
        """The position at the chat's state in `read`: where a hub starts. A hub's position
        never comes from a client's cursor (a cursor from the future would silence the others)."""
        return cls(
            message_id=read.newest_message_id or 0,
            part_id=read.newest_part_id,
            in_step=read.newest_part_id > 0,
            status=read.status,
            version=read.version,
            generation=read.generation,
            error_key=read.error_key,
            queue_key=read.queue_key,
        )

    @property
    def cursor(self) -> StreamCursor:
        return StreamCursor(self.message_id, self.part_id if self.in_step else 0)


def advance(read: ChatRead, position: Position) -> list[Frame]:  # noqa: PLR0912  one pure protocol step; its order is the point
    """The frames that take `position` to the state of `read` (and move it there)."""
    cid = str(read.chat_id)
    if not read.exists:
        return [
            Frame(
                "error",
                error_event(cid, message="the chat was deleted", kind="deleted", retryable=False),
                position.cursor,
                final=True,
            )
        ]
    frames: list[Frame] = []
    reset_from = (read.resets or {}).get(position.message_id)
    if reset_from is not None:
        position.message_id = reset_from - 1
        position.in_step = False
        frames.append(_reset_frame(cid, reset_from, "edit", position))
    if read.messages is not None:
        for message_id, payload in read.messages:
            if message_id > position.message_id:
                position.message_id = message_id
                position.in_step = False
                frames.append(Frame("message", payload, position.cursor))
        if read.more_messages:
            return frames  # one page of a longer history: the rest comes with the last page
        newest = read.newest_message_id
        if reset_from is None and newest is not None and position.message_id > newest:
            # A cursor beyond the chat's newest message (from the future, or hostile): there is
            # nothing after it to replay; the position continues from the chat's state.
            position.message_id = newest
    if read.parts is not None:
        fresh = [part for part in read.parts if part.id > position.part_id]
        last_retry = max((i for i, part in enumerate(fresh) if part.is_retry), default=None)
        if last_retry is not None:
            fresh = fresh[last_retry:]  # a retry voids everything before it
        elif position.in_step and all(part.id != position.part_id for part in read.parts):
            # The step this position follows is gone without a message and without a retry
            # notice: its run failed, was requeued or taken over. Its parts are void.
            position.in_step = False
            frames.append(_reset_frame(cid, position.message_id + 1, "step_discarded", position))
        for part in fresh:
            position.part_id = part.id
            position.in_step = True
            frames.append(
                Frame("retry" if part.is_retry else "message_part", part.payload, position.cursor)
            )
    if position.status is None or read.version > position.version:
        changed = position.status != read.status or (
            read.status == "error" and position.error_key != read.error_key
        )
        position.version = read.version
        position.generation = read.generation
        if changed:
            position.status = read.status
            position.error_key = read.error_key
            assert read.status_payload is not None
            frames.append(Frame("status", read.status_payload, position.cursor))
            if read.error_payload is not None:
                frames.append(Frame("error", read.error_payload, position.cursor))
    if read.queue_payload is not None and read.queue_key != position.queue_key:
        position.queue_key = read.queue_key
        frames.append(Frame("queue", read.queue_payload, position.cursor))
    return frames


def _reset_frame(chat_id: str, from_message_id: int, reason: str, position: Position) -> Frame:
    return Frame(
        "history_reset",
        Payload(
            {
                "type": "history_reset",
                "chat_id": chat_id,
                "from_message_id": from_message_id,
                "reason": reason,
            }
        ),
        position.cursor,
    )


def notice_frame(chat_id: uuid.UUID, cursor: StreamCursor | None, kind: str, message: str) -> Frame:
    """A final `error` frame that tells a client to reconnect from `cursor` (kind `resync`
    after an overflow, `shutdown` when the replica stops, `unavailable` when the hub failed)."""
    return Frame(
        "error",
        error_event(
            str(chat_id),
            message=message,
            kind=kind,
            retryable=True,
            detail=f"reconnect with cursor {cursor}" if cursor is not None else None,
        ),
        cursor,
        final=True,
    )


# --------------------------------------------------------------------------------------------
# Clients and hubs.


class StreamClient:
    """One connected watcher: a bounded queue of frames that its connection's writer drains.

    A client joins with a snapshot from its cursor, read page by page (`streams_read`): the next
    page is read only once the writer has taken every frame of the previous one, and live frames
    start after the last page. So the queue holds at most one snapshot page (not counted against
    the bound: a page is bounded by itself, and its frames are shared) plus the live frames,
    which are counted. On overflow the queue is replaced by one final `resync` frame."""

    def __init__(self, chat_id: uuid.UUID, cursor: StreamCursor, max_queued: int) -> None:
        self.chat_id = chat_id
        self.position = Position.at(cursor)
        self.delivered = cursor  # the cursor of the last frame handed to the writer
        self.overflowed = False
        self.closed = False
        self.left = False  # its connection is gone
        self.catching_up = False  # given a snapshot page; the next one is read once it drained
        self.on_drained: Callable[[], None] | None = None  # the hub's "read its next page"
        self._max_queued = max_queued
        self._frames: deque[Frame] = deque()
        self._snapshot_left = 0
        self._ready = asyncio.Event()

    @property
    def queued(self) -> int:
        return len(self._frames)

    def push_snapshot(self, frames: list[Frame], *, more: bool = False) -> None:
        """Queue a snapshot page; `more` when it is not the last one."""
        if self.closed:
            return
        self.catching_up = more
        self._frames.extend(frames)
        self._snapshot_left += len(frames)
        if frames:
            self._ready.set()
            if frames[-1].final:
                self.closed = True
                self.catching_up = False

    def push(self, frames: list[Frame]) -> bool:
        """Queue live frames; False when the client overflowed (it is closed then)."""
        if self.closed:
            return not self.overflowed
        for frame in frames:
            if len(self._frames) - self._snapshot_left >= self._max_queued:
                self.overflowed = True
                self.finish(
                    notice_frame(
                        self.chat_id,
                        self.delivered,
                        "resync",
                        "the client fell behind; reconnect from the cursor",
                    ),
                    drop_queued=True,
                )
                return False
            self._frames.append(frame)
            if frame.final:
                self.closed = True
                break
        self._ready.set()
        return True

    def finish(self, frame: Frame, *, drop_queued: bool = False) -> None:
        """Queue a final frame (after what is queued, or instead of it)."""
        if self.closed and not drop_queued:
            return
        if drop_queued:
            self._frames.clear()
            self._snapshot_left = 0
        self._frames.append(frame)
        self.closed = True
        self.catching_up = False
        self._ready.set()

    def abort(self) -> None:
        """The connection is gone: drop everything and wake the writer so that it stops."""
        self.closed = True
        self.catching_up = False
        self._frames.clear()
        self._snapshot_left = 0
        self._ready.set()

    def tail_cursor(self) -> StreamCursor:
        """The cursor a client will hold once everything queued is delivered."""
        for frame in reversed(self._frames):
            if frame.cursor is not None:
                return frame.cursor
        return self.delivered

    async def next(self, timeout_s: float) -> Frame | None:
        """The next frame; None when nothing came within timeout_s (time for a keepalive), or
        at once when the client is closed and everything queued was handed out."""
        if not self._frames:
            if self.closed:
                return None
            self._ready.clear()
            await wait_event(self._ready, timeout_s)
            if not self._frames:
                return None
        frame = self._frames.popleft()
        if self._snapshot_left:
            self._snapshot_left -= 1
        if frame.cursor is not None:
            self.delivered = frame.cursor
        if self.catching_up and not self._frames and self.on_drained is not None:
            self.on_drained()  # read the next page while this frame is being written
        return frame


@dataclass(frozen=True)
class ReadRequest:
    """What one hub asks of one read (see `streams_read`)."""

    chat_id: uuid.UUID
    history: bool
    after_message_id: int
    from_part_id: int
    queue: bool
    message_cursors: list[int]
    state: bool = False  # also the chat's newest message and live part ids


@dataclass(frozen=True)
class ReadPolicy:
    """Paging, deadlines and retries of hub reads."""

    # A snapshot page: at most this many messages and this many bytes of message content (and
    # always at least one message).
    page_messages: int = 100
    page_bytes: int = 1_000_000
    # A statement that takes longer, or a request that waits longer for a statement slot, has
    # failed (TimeoutError, an outage): a stalled or black-holed database must not wedge a hub.
    deadline_s: float = 10.0
    # A hub retries a read that failed because of an outage or contention with a backoff from
    # `retry_initial_s` doubling up to `retry_max_s`, its clients staying connected (they get
    # keep-alives); when the failures last `give_up_after_s`, its clients are told to
    # reconnect (`unavailable`). Any other failure is a bug: they are told at once.
    retry_initial_s: float = 0.1
    retry_max_s: float = 2.0
    give_up_after_s: float = 30.0


class StreamReader:
    """Serves the reads of all the hubs of a replica: the requests made while no statement can
    be sent (the same loop iteration, or while `max_in_flight` statements are in flight) share
    the next one. A request is only ever served by a statement sent after it was made, so a hub
    that was notified and then asked still reads everything the notification announced. The
    requests of one `read_many` call are always served by the same statement (one snapshot of
    the database).

    A hub cancelled while it waits simply drops its requests (the statement, shared with others,
    goes on). Deadlines (`ReadPolicy.deadline_s`): every statement has one, and a request that
    could not be sent within one (every statement slot stayed busy) fails with TimeoutError; so
    a read fails or is answered within two deadlines, with no timer per read."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_in_flight: int = 2,
        max_per_statement: int = 500,
        policy: ReadPolicy | None = None,
    ) -> None:
        self._pool = pool
        self._max_in_flight = max_in_flight
        self._max_per_statement = max_per_statement
        self.policy = policy if policy is not None else ReadPolicy()
        # Groups of requests served by one statement, with the loop time they were made at.
        self._pending: deque[tuple[float, list[tuple[ReadRequest, asyncio.Future[ChatRead]]]]] = (
            deque()
        )
        self._scheduled = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self._abandoned: set[asyncio.Task[list[Any]]] = set()  # past their deadline, cancelled
        self.statements = 0

    async def read(self, request: ReadRequest) -> ChatRead:
        return (await self.read_many([request]))[0]

    async def read_many(self, requests: list[ReadRequest]) -> list[ChatRead]:
        """Reads served together, by one statement."""
        loop = asyncio.get_running_loop()
        group = [(request, loop.create_future()) for request in requests]
        self._pending.append((loop.time(), group))
        self._schedule()
        if len(group) == 1:  # a hub's live read: no gathering needed
            return [await group[0][1]]
        return list(await asyncio.gather(*(future for _request, future in group)))

    def _schedule(self) -> None:
        if self._scheduled or not self._pending or len(self._in_flight) >= self._max_in_flight:
            return
        # Next loop iteration: the hubs woken by the same batch of notifications ask first.
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        expired = asyncio.get_running_loop().time() - self.policy.deadline_s
        while self._pending and len(self._in_flight) < self._max_in_flight:
            batch: list[tuple[ReadRequest, asyncio.Future[ChatRead]]] = []
            while self._pending and (
                not batch or len(batch) + len(self._pending[0][1]) <= self._max_per_statement
            ):
                made_at, group = self._pending.popleft()
                if made_at < expired:
                    # Every statement slot stayed busy for a whole deadline (a stalled database).
                    for _request, future in group:
                        if not future.done():
                            future.set_exception(TimeoutError("no statement slot in time"))
                    continue
                batch.extend(item for item in group if not item[1].done())
            if not batch:
                continue
            task = asyncio.create_task(self._serve(batch), name="stream-read")
            self._in_flight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._schedule()

    async def _serve(self, batch: list[tuple[ReadRequest, asyncio.Future[ChatRead]]]) -> None:
        requests = [request for request, _future in batch]
        args = (
            [r.chat_id for r in requests],
            [r.history for r in requests],
            [r.after_message_id for r in requests],
            [r.from_part_id for r in requests],
            [r.queue for r in requests],
            sorted({cursor for r in requests for cursor in r.message_cursors}),
            self.policy.page_messages,
            self.policy.page_bytes,
            [r.state for r in requests],
        )
        try:
            rows = await self._fetch_within_deadline(args, single=len(batch) == 1)
        except BaseException as exc:
            for _request, future in batch:
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (request, future), row in zip(batch, rows, strict=True):
            if not future.done():
                future.set_result(ChatRead.from_row(request.chat_id, row))

    async def _fetch_within_deadline(self, args: tuple[Any, ...], *, single: bool) -> list[Any]:
        """The statement, or TimeoutError after `deadline_s`. The statement runs in a task of its
        own that is cancelled, not awaited, at the deadline: cancelling a query makes asyncpg
        wait for the server to acknowledge before releasing the connection, and a black-holed
        server never does. Its connection is released (or dropped) in the background."""
        statement = asyncio.create_task(self._fetch_once(args, single=single), name="stream-sql")
        try:
            done, _pending = await asyncio.wait({statement}, timeout=self.policy.deadline_s)
        except asyncio.CancelledError:
            self._abandon(statement)
            raise
        if not done:
            self._abandon(statement)
            raise TimeoutError(f"stream read took longer than {self.policy.deadline_s}s")
        return statement.result()

    def _abandon(self, statement: asyncio.Task[list[Any]]) -> None:
        statement.cancel()
        self._abandoned.add(statement)
        statement.add_done_callback(self._forget_abandoned)

    def _forget_abandoned(self, statement: asyncio.Task[list[Any]]) -> None:
        self._abandoned.discard(statement)
        if not statement.cancelled():
            statement.exception()  # retrieved: it was failed already, by its deadline

    async def _fetch_once(self, args: tuple[Any, ...], *, single: bool) -> list[Any]:
        self.statements += 1
        try:
            return await self._fetch(args, single=single)
        except asyncpg.exceptions.OutdatedSchemaCacheError:
            # The rows are decoded as the tables' composite types; a migration that changed one
            # (a rolling deploy) makes asyncpg drop its type cache and raise once.
            self.statements += 1
            return await self._fetch(args, single=single)

    async def _fetch(self, args: tuple[Any, ...], *, single: bool) -> list[Any]:
        # A lone request (the usual case at low load) reads its one row with fetchrow.
        if single:
            return [await self._pool.fetchrow(Q.sql("streams_read"), *args)]
        return list(await self._pool.fetch(Q.sql("streams_read"), *args))

    async def aclose(self) -> None:
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))
        for _made_at, group in self._pending:
            for _request, future in group:
                future.cancel()
        self._pending.clear()


@dataclass
class HubCounters:
    reads: int = 0  # reads of this hub (each one row of a `streams_read` statement)
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
            async with (
                self._listener.subscribe(self.channel) as subscription,
                asyncio.TaskGroup() as tasks,
            ):
                # Armed: from here on every commit to this chat reaches _pump, so the first read
                # below (the snapshot of the first clients) misses nothing that follows it.
                pump = tasks.create_task(
                    self._pump(subscription), name=f"stream-hub-pump:{self.chat_id}"
                )
                await self._serve()
                pump.cancel()  # the chat is gone: nothing more to stream
        except Exception as exc:
            # A per-chat hub failing must not take the replica down: its clients are told to
            # reconnect (which builds a new hub) and the failure is logged loudly.
            log.error("stream.hub_failed", chat_id=self.chat_id, error=repr(exc), exc_info=True)
            self.close_all("unavailable", "the stream failed on this replica; reconnect")
            self._on_failed(self)
        finally:
            self.finished = True

    async def _pump(self, subscription: Subscription) -> None:
        """Turn notifications into "what to re-read" flags; the loop reads once for all."""
        async for event in subscription:
            if isinstance(event, Resync):
                self.counters.resyncs += 1
                self._want_history = self._want_queue = True
            else:
                self.counters.notifications += 1
                self._note(event.payload)
            self._dirty.set()

    def _note(self, payload: str) -> None:
        try:
            notice = json.loads(payload)
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
        # A client catching up gets its next page once it has taken the previous one.
        self._catching_up = [client for client in self._catching_up if not client.closed]
        paging = [client for client in self._catching_up if client.queued == 0]
        snapshots = joiners + paging
        history = self._want_history or bool(snapshots)
        queue = self._want_queue or bool(snapshots)
        chat = self._want_chat
        self._want_history = self._want_queue = self._want_chat = False
        if not (history or queue or chat) or (self._position is None and not snapshots):
            return True  # nothing to read, or nobody to read it for
        self._in_flight = joiners
        try:
            hub_read, snapshot_reads = await self._read(snapshots, history=history, queue=queue)
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
        alive = self._advance_hub(hub_read)
        for client, read in snapshot_reads:
            self._serve_snapshot(client, read, hub_caught_up=not hub_read.more_messages)
        if alive and any(client.queued == 0 for client in self._catching_up):
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

    async def _read(
        self, snapshots: list[StreamClient], *, history: bool, queue: bool
    ) -> tuple[ChatRead, list[tuple[StreamClient, ChatRead]]]:
        """The hub's own read and the snapshot pages of `snapshots` (one request per distinct
        cursor), in one statement. Each position is read from its own cursor: a cursor only
        ever bounds what its own client gets."""
        self.counters.reads += 1
        position = self._position
        if position is None:
            # The hub's first read: only the chat's state, which becomes its position.
            own = ReadRequest(self.chat_id, True, MAX_ID, MAX_ID, True, [], state=True)
        else:
            own = ReadRequest(
                chat_id=self.chat_id,
                history=history,
                after_message_id=position.message_id,
                from_part_id=position.part_id,
                queue=queue,
                message_cursors=[position.message_id] if position.message_id > 0 else [],
            )
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
            )
            for message_id, part_id in by_cursor
        ]
        reads = await self._reader.read_many(requests)  # within 2 x deadline_s (StreamReader)
        served = [
            (client, read)
            for clients, read in zip(by_cursor.values(), reads[1:], strict=True)
            for client in clients
        ]
        return reads[0], served


@dataclass(frozen=True)
class StreamStats:
    hubs: int
    clients: int
    reads: int  # hub reads (one per batch of notifications of one chat)
    notifications: int
    resyncs: int
    overflows: int
    statements: int = 0  # the `streams_read` statements that served them (shared by hubs)
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


# --------------------------------------------------------------------------------------------
# The caller's chat list (`GET /api/v1/chats/watch`): straight from `chat_owner:<user id>`.


def owner_channel(user_id: uuid.UUID) -> str:
    return f"chat_owner:{user_id}"


def owner_frame(event: Notice | Resync) -> Frame | None:
    """A chat-list change as a frame: `created`, `updated` (status, title or archived changed)
    or `deleted`, with the chat's new summary; `resync` when notifications may have been lost
    (the client re-lists)."""
    if isinstance(event, Resync):
        reason = "overflow" if event.reason == "overflow" else "reconnected"
        return Frame(
            "resync",
            Payload({"type": "resync", "reason": reason}),
            None,
            final=event.reason == "overflow",
        )
    try:
        notice = json.loads(event.payload)
        kind = notice["type"]
        chat_id = notice["chat_id"]
    except (ValueError, TypeError, KeyError):
        return None
    if kind not in ("created", "updated", "deleted"):
        return None
    return Frame(
        kind,
        Payload(
            {
                "type": kind,
                "chat_id": chat_id,
                "version": notice.get("version"),
                "status": notice.get("status"),
                "title": notice.get("title"),
                "archived": notice.get("archived"),
                "parent_chat_id": notice.get("parent_chat_id"),
            }
        ),
        None,
    )
