"""The coalesced part flusher (DESIGN.md §5): one per replica. Runs hand it the live parts of
the steps they stream; every `interval` window ONE transaction (one multi-row INSERT) carries
the buffered parts of ALL the chats this replica runs, so the notification commit lock is taken
about once per window per replica, not once per token or per chat. Nothing is written while
the buffer is empty.

Ordering rule: no part of a step may commit after the step's message (it would show up as a
live part of the next step). Before a run persists output it calls `settle(chat_id)`: that waits
until the chat's buffered parts were written by the regular windowed flush (at most about one
window), so readers see the step's parts complete. Before a run gives up output (retry, error,
shutdown, lost chat) it calls `discard(chat_id)`: that waits for a flush in flight (the lock is
held for the whole flush statement) and drops what is still buffered for the chat.

Consecutive text (or reasoning) deltas of one chat inside one window are merged into one part:
readers see the same text in fewer rows. The buffer is bounded; a run that hits the bound waits
(backpressure) until the next flush makes room."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.db import is_connection_error, project_queries
from app.log import get_logger
from app.runs import RunToken

Q = project_queries()
log = get_logger(__name__)

_MERGEABLE = frozenset({"text", "reasoning"})


@dataclass
class BufferedPart:
    token: RunToken
    role: str
    part: dict[str, Any]


@dataclass
class FlushStats:
    """Counters for benchmarks and /metrics: `transactions` is the number of notifying commits."""

    transactions: int = 0
    parts_buffered: int = 0
    parts_written: int = 0
    parts_fenced: int = 0  # buffered for a chat this replica no longer owns: not written
    parts_discarded: int = 0
    parts_merged: int = 0
    failures: int = 0
    max_chats_per_flush: int = 0


class PartFlusher:
    """Run `run()` as a long-lived task; `add()` and `discard()` from the runs."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        interval_ms: float = 15.0,
        max_buffered_parts: int = 10_000,
        retry_backoff_s: float = 0.2,
    ) -> None:
        self._pool = pool
        self._interval_s = interval_ms / 1000.0
        self._max_buffered = max_buffered_parts
        self._retry_backoff_s = retry_backoff_s
        self._buffer: list[BufferedPart] = []
        self._lock = asyncio.Lock()  # held for a whole flush transaction, and by discard()
        self._nonempty = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._in_flight: frozenset[uuid.UUID] = frozenset()  # chats in the flush being written
        self._flush_ended: asyncio.Future[None] | None = None  # resolved when a flush ends
        self.stats = FlushStats()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def full(self) -> bool:
        """A run is waiting for room (the next flush is due at once)."""
        return not self._room.is_set()

    async def add(self, token: RunToken, role: str, part: dict[str, Any]) -> None:
        """Buffer one live part for the next window; waits while the buffer is full."""
        while len(self._buffer) >= self._max_buffered:
            self._room.clear()
            self._nonempty.set()
            await self._room.wait()
        self.stats.parts_buffered += 1
        last = self._buffer[-1] if self._buffer else None
        kind = part.get("type")
        if (
            last is not None
            and kind in _MERGEABLE
            and last.token == token
            and last.role == role
            and last.part.get("type") == kind
        ):
            last.part = {"type": kind, "text": str(last.part.get("text", "")) + str(part["text"])}
            self.stats.parts_merged += 1
            return
        self._buffer.append(BufferedPart(token, role, dict(part)))
        self._nonempty.set()

    def holds(self, chat_id: uuid.UUID) -> bool:
        """Whether a part of the chat is buffered or being written."""
        return chat_id in self._in_flight or any(p.token.chat_id == chat_id for p in self._buffer)

    async def settle(self, chat_id: uuid.UUID, *, timeout_s: float = 5.0) -> None:
        """Wait until every part buffered for the chat so far is written by the regular
        windowed flush (so readers get the step's live parts complete, and no flush is
        spent on one chat). Afterwards no flush can carry a part of the chat unless the run
        adds one. If the database does not take them within `timeout_s`, they are dropped
        (`discard`): the guarantee holds either way."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.holds(chat_id):
                    self._nonempty.set()
                    await asyncio.shield(self._next_flush_end())
        except TimeoutError:
            await self.discard(chat_id)

    def _next_flush_end(self) -> asyncio.Future[None]:
        if self._flush_ended is None or self._flush_ended.done():
            self._flush_ended = asyncio.get_running_loop().create_future()
        return self._flush_ended

    async def discard(self, chat_id: uuid.UUID) -> None:
        """Make sure no part of this chat buffered so far is ever written: wait for a flush in
        flight to commit (or fail), then drop what is left for the chat."""
        async with self._lock:
            self.drop(chat_id)

    def drop(self, chat_id: uuid.UUID) -> None:
        """Drop the chat's buffered parts without waiting for a flush in flight (for a run that is
        over; a flush in flight is fenced in SQL)."""
        kept = [p for p in self._buffer if p.token.chat_id != chat_id]
        self.stats.parts_discarded += len(self._buffer) - len(kept)
        self._buffer = kept
        if len(self._buffer) < self._max_buffered:
            self._room.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_flush = loop.time() - self._interval_s
        while True:
            await self._nonempty.wait()
            # Wait out the rest of the window so one transaction carries everything in it, unless
            # the buffer is full (a run is waiting for room).
            delay_s = last_flush + self._interval_s - loop.time()
            if delay_s > 0 and self._room.is_set():
                await asyncio.sleep(delay_s)
            last_flush = loop.time()
            if not await self.flush():
                await asyncio.sleep(self._retry_backoff_s)

    async def flush(self) -> bool:
        """Write everything buffered in one transaction. False when the database failed; the
        parts stay buffered (in order) for the next attempt."""
        try:
            return await self._flush()
        finally:
            self._in_flight = frozenset()
            ended = self._flush_ended
            if ended is not None and not ended.done():
                ended.set_result(None)

    async def _flush(self) -> bool:
        async with self._lock:
            batch, self._buffer = self._buffer, []
            self._nonempty.clear()
            if not batch:
                return True
            self._in_flight = frozenset(p.token.chat_id for p in batch)
            try:
                written = await self._write(batch)
            except (Exception, asyncio.CancelledError) as exc:
                self._buffer = batch + self._buffer
                self._nonempty.set()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if not (is_connection_error(exc) or isinstance(exc, asyncpg.PostgresError)):
                    raise
                self.stats.failures += 1
                log.warning("parts.flush_failed", parts=len(batch), error=repr(exc))
                return False
            self._room.set()
        self.stats.transactions += 1
        self.stats.parts_written += written
        self.stats.parts_fenced += len(batch) - written
        self.stats.max_chats_per_flush = max(self.stats.max_chats_per_flush, len(self._in_flight))
        return True

    async def _write(self, batch: list[BufferedPart]) -> int:
        # One autocommit statement is one transaction (see parts_flush).
        written: int = await self._pool.fetchval(
            Q.sql("parts_flush"),
            [p.token.chat_id for p in batch],
            [p.token.worker_id for p in batch],
            [p.token.generation for p in batch],
            [p.role for p in batch],
            [json.dumps(p.part) for p in batch],
        )
        return written
