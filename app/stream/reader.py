"""The stream's one read (sql/queries/stream.sql): the reads of every hub of this replica that
needs one at the same moment, in ONE statement. A worker's flush notifies every chat it streams
at once; their hubs here then cost one statement, not one each. One statement is also one
snapshot, so a step's message and the deletion of its live parts are never both missed."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.db.queries import project_queries
from app.stream.position import ChatRead

Q = project_queries()


@dataclass(slots=True)
class ReadRequest:
    """What one hub asks of one read (see `stream_read`). Not frozen: one is made per read, and
    a frozen dataclass sets each field through `object.__setattr__`."""

    chat_id: uuid.UUID
    history: bool
    after_message_id: int
    from_part_id: int
    queue: bool
    message_cursors: Sequence[int]
    state: bool = False  # also the chat's newest message and live part ids
    cid: str = ""  # str(chat_id) when the caller has it (the events carry it)


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
        return await self.submit(request)

    def submit(self, request: ReadRequest) -> asyncio.Future[ChatRead]:
        """One read, as a future (a hub's live read awaits it directly; cancelling it drops
        the request)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ChatRead] = loop.create_future()
        self._pending.append((loop.time(), [(request, future)]))
        self._schedule()
        return future

    async def read_many(self, requests: list[ReadRequest]) -> list[ChatRead]:
        """Reads served together, by one statement."""
        loop = asyncio.get_running_loop()
        group = [(request, loop.create_future()) for request in requests]
        self._pending.append((loop.time(), group))
        self._schedule()
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
                future.set_result(ChatRead.from_row(request.chat_id, row, cid=request.cid))

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
            # Messages and the queue are decoded as the tables' composite types; a migration
            # that changed one (a rolling deploy) makes asyncpg drop its type cache and raise
            # once.
            self.statements += 1
            return await self._fetch(args, single=single)

    async def _fetch(self, args: tuple[Any, ...], *, single: bool) -> list[Any]:
        # A lone request (the usual case at low load) reads its one row with fetchrow.
        if single:
            return [await self._pool.fetchrow(Q.sql("stream_read"), *args)]
        return list(await self._pool.fetch(Q.sql("stream_read"), *args))

    async def aclose(self) -> None:
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))
        for _made_at, group in self._pending:
            for _request, future in group:
                future.cancel()
        self._pending.clear()
