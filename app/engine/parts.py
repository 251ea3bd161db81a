"""The coalesced part flusher (docs/engine.md, "Coalesced flush"): one per replica. Runs hand
it the live parts of the steps they stream; every `interval` window ONE statement (one
multi-row INSERT) carries the buffered parts of ALL the runs of this replica, so the
notification commit lock is taken about once per window per replica, not once per token or per
chat. Nothing is written while the buffer is empty.

Everything is keyed by the run's token (chat id + worker + generation), never by the chat id
alone: one replica may briefly run two generations of the same chat (the old run still
stopping after an edit while the new one already streams), and each must only ever settle,
discard or drop its own parts.

Ordering rule: no part of a step may commit after the step's message (it would show up as a
live part of the next step). Before a run persists output it calls `settle(token)`: that waits
until the run's buffered parts were written by the regular windowed flush (at most about one
window), so readers see the step's parts complete. Before a run gives up output (retry, error,
shutdown, lost chat) it calls `discard(token)`: that waits for a flush in flight (the lock is
held for the whole flush statement) and drops what is still buffered for the run. The flush
statement takes no chat row lock (see parts_flush): this in-process order is the guarantee.

Failures. An outage (app.db: the database is gone, or the statement passed its deadline) keeps
the batch, in order, and retries with capped exponential backoff; the buffer stays bounded
(runs wait for room). Anything else the database refuses (a bug, or a poison part) is isolated:
the batch is retried one run at a time, the parts of the runs that still fail are dropped with
a log line naming the chat, and the rest goes through. A batch is never retried forever.

Deadlines. The flush statement has `flush_timeout_s`; `discard` waits at most
`discard_timeout_s` for a flush in flight and then drops the run's parts without it (the
statement in flight is cancelled by its own deadline; a part of it that still commits belongs
to a step that is never persisted: stream readers skip it once the chat is not running that
generation, and the next persist of the chat deletes every live part of it).

Consecutive text (or reasoning) deltas of one run inside one window are merged into one part:
readers see the same text in fewer rows. The buffer is bounded; a run that hits the bound waits
(backpressure) until the next flush makes room."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from app import instruments
from app.aio import Backoff, wait_event
from app.db.failures import is_transient
from app.db.queries import project_queries
from app.log import get_logger
from app.state.runs import RunToken
from app.text import json_dumps

Q = project_queries()
log = get_logger(__name__)

_MERGEABLE = frozenset({"text", "reasoning"})
# Bound of one flush statement; a stalled database makes it an outage (batch kept, retried).
FLUSH_TIMEOUT_S = 5.0
# How long discard() waits for a flush in flight before it drops the run's parts without it.
DISCARD_TIMEOUT_S = FLUSH_TIMEOUT_S + 1.0
# The backoff between failed flushes doubles from retry_backoff_s up to this.
RETRY_BACKOFF_MAX_S = 2.0


@dataclass(slots=True)
class BufferedPart:
    token: RunToken
    role: str
    part: dict[str, Any]
    # The part's key within its run (unique per flusher, i.e. per process, so per run): a flush
    # retried after an outage that left its commit unknown writes each part at most once
    # (parts_flush: ON CONFLICT DO NOTHING).
    seq: int
    # Sent in a flush whose outcome is unknown: it may be in the table as it is, so nothing
    # may be merged into it any more.
    sealed: bool = False


@dataclass
class FlushStats:
    """Counters for benchmarks and /metrics: `transactions` is the number of notifying commits."""

    transactions: int = 0
    parts_buffered: int = 0
    parts_written: int = 0
    parts_fenced: int = 0  # buffered for a chat this replica no longer owns: not written
    parts_discarded: int = 0
    parts_merged: int = 0
    parts_rejected: int = 0  # refused by the database (a bug, a poison part): dropped
    failures: int = 0
    timeouts: int = 0  # flush statements or discard waits that passed their deadline
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
        flush_timeout_s: float = FLUSH_TIMEOUT_S,
        discard_timeout_s: float = DISCARD_TIMEOUT_S,
    ) -> None:
        self._pool = pool
        self._interval_s = interval_ms / 1000.0
        self._max_buffered = max_buffered_parts
        self._retry_backoff_s = retry_backoff_s
        self._flush_timeout_s = flush_timeout_s
        self._discard_timeout_s = discard_timeout_s
        self._buffer: list[BufferedPart] = []
        self._seq = itertools.count(1)
        self._lock = asyncio.Lock()  # held for a whole flush statement, and by discard()
        self._nonempty = asyncio.Event()
        # An urgent settle (a Stop is waiting on it): the window is cut short.
        self._flush_now = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._in_flight: frozenset[RunToken] = frozenset()  # runs in the flush being written
        # Runs dropped while their parts were in flight: if that flush fails, their parts are
        # not put back (the run has moved on, e.g. persisted the step).
        self._dropped_in_flight: set[RunToken] = set()
        self._flush_ended: asyncio.Future[None] | None = None  # resolved when a flush ends
        self.stats = FlushStats()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def full(self) -> bool:
        """A run is waiting for room (the next flush is due at once)."""
        return not self._room.is_set()

    def offer(self, token: RunToken, role: str, part: dict[str, Any]) -> bool:
        """Buffer one live part for the next window if the buffer has room, without awaiting
        (the path of every streamed delta). False when it is full: then `await add()`."""
        buffer = self._buffer
        if len(buffer) >= self._max_buffered:
            return False
        self.stats.parts_buffered += 1
        kind = part.get("type")
        if kind in _MERGEABLE and buffer:
            last = buffer[-1]
            # `is` first: a run hands in the same token object with every part.
            if (
                not last.sealed
                and (last.token is token or last.token == token)
                and last.role == role
                and last.part.get("type") == kind
            ):
                # The buffered dict is the flusher's own copy: extended in place.
                last.part["text"] = str(last.part.get("text", "")) + str(part["text"])
                self.stats.parts_merged += 1
                return True
        buffer.append(BufferedPart(token, role, dict(part), next(self._seq)))
        self._nonempty.set()
        return True

    async def add(self, token: RunToken, role: str, part: dict[str, Any]) -> None:
        """Buffer one live part for the next window; waits while the buffer is full."""
        while not self.offer(token, role, part):
            self._room.clear()
            self._nonempty.set()
            await self._room.wait()

    def holds(self, token: RunToken) -> bool:
        """Whether a part of the run is buffered or being written."""
        return token in self._in_flight or any(p.token == token for p in self._buffer)

    async def settle(
        self, token: RunToken, *, urgent: bool = False, timeout_s: float = 5.0
    ) -> None:
        """Wait until every part buffered for the run so far is written by the regular
        windowed flush (so readers get the step's live parts complete, and no flush is
        spent on one chat). Afterwards no flush can carry a part of the run unless it adds
        one. `urgent` (a user waits for it, e.g. a Stop): the window in progress ends now
        instead (one flush a little earlier, for every run's parts). If the database does not
        take them within `timeout_s`, they are dropped (`discard`): the guarantee holds either
        way."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.holds(token):
                    self._nonempty.set()
                    if urgent:
                        self._flush_now.set()
                    await asyncio.shield(self._next_flush_end())
        except TimeoutError:
            await self.discard(token)

    def _next_flush_end(self) -> asyncio.Future[None]:
        if self._flush_ended is None or self._flush_ended.done():
            self._flush_ended = asyncio.get_running_loop().create_future()
        return self._flush_ended

    async def discard(self, token: RunToken) -> None:
        """Make sure no part of this run buffered so far is ever written: wait for a flush in
        flight to commit (or fail), then drop what is left for the run. The wait is bounded
        (`discard_timeout_s`): past it the parts are dropped without the lock (see the module
        docstring for what becomes of the statement in flight)."""
        try:
            async with asyncio.timeout(self._discard_timeout_s):
                await self._lock.acquire()
        except TimeoutError:
            self.stats.timeouts += 1
            log.warning(
                "parts.discard_timeout", chat_id=token.chat_id, wait_s=self._discard_timeout_s
            )
            self.drop(token)
            return
        try:
            self.drop(token)
        finally:
            self._lock.release()

    def drop(self, token: RunToken) -> None:
        """Drop the run's buffered parts without waiting for a flush in flight (for a run that is
        over; a flush in flight is fenced in SQL)."""
        if token in self._in_flight:
            self._dropped_in_flight.add(token)
        kept = [p for p in self._buffer if p.token != token]
        self.stats.parts_discarded += len(self._buffer) - len(kept)
        self._buffer = kept
        if len(self._buffer) < self._max_buffered:
            self._room.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_flush = loop.time() - self._interval_s
        backoff = Backoff(initial_s=self._retry_backoff_s, max_s=RETRY_BACKOFF_MAX_S)
        while True:
            await self._nonempty.wait()
            # Wait out the rest of the window so one statement carries everything in it, unless
            # the buffer is full (a run is waiting for room).
            delay_s = last_flush + self._interval_s - loop.time()
            if delay_s > 0 and self._room.is_set():
                await wait_event(self._flush_now, delay_s)
            self._flush_now.clear()
            last_flush = loop.time()
            if await self.flush():
                backoff.reset()
            else:
                backoff.grow()
                await asyncio.sleep(backoff.delay_s)

    async def flush(self) -> bool:
        """Write everything buffered. False when the database is out (or past the deadline);
        the parts of the runs not written stay buffered (in order) for the next attempt."""
        try:
            return await self._flush()
        finally:
            self._in_flight = frozenset()
            self._dropped_in_flight.clear()
            ended = self._flush_ended
            if ended is not None and not ended.done():
                ended.set_result(None)

    async def _flush(self) -> bool:
        async with self._lock:
            batch, self._buffer = self._buffer, []
            self._nonempty.clear()
            if not batch:
                return True
            self._in_flight = frozenset(p.token for p in batch)
            try:
                written = await self._write(batch)
            except asyncio.CancelledError:
                self._keep(batch)
                raise
            except Exception as exc:
                # An outage or contention: the same batch may go through later. Anything else
                # (the database refused the data) fails the same way again.
                if is_transient(exc):
                    return self._failed(batch, exc)
                log.warning("parts.flush_refused", parts=len(batch), error=repr(exc))
                return await self._flush_one_run_at_a_time(batch)
            self._written(batch, written, runs=len(self._in_flight))
            self._room.set()
        return True

    async def _flush_one_run_at_a_time(self, batch: list[BufferedPart]) -> bool:
        """The batch was refused as a bug: find the run(s) that cause it, drop their parts,
        write the others. An outage on the way keeps what is not written yet."""
        groups = _by_run(batch)
        for index, (token, parts) in enumerate(groups):
            try:
                written = await self._write(parts)
            except asyncio.CancelledError:
                self._keep([p for _token, rest in groups[index:] for p in rest])
                raise
            except Exception as exc:
                if is_transient(exc):
                    return self._failed([p for _token, rest in groups[index:] for p in rest], exc)
                self.stats.parts_rejected += len(parts)
                log.error(
                    "parts.rejected",
                    chat_id=token.chat_id,
                    generation=token.generation,
                    parts=len(parts),
                    error=repr(exc),
                    exc_info=True,
                )
                continue
            self._written(parts, written, runs=1)
        self._room.set()
        return True

    def _keep(self, batch: list[BufferedPart]) -> None:
        """Put the parts of a failed flush back in front, except those of runs dropped
        meanwhile (a discard that passed its deadline, a run that ended)."""
        dropped = self._dropped_in_flight
        kept = [p for p in batch if p.token not in dropped] if dropped else batch
        for part in kept:
            part.sealed = True
        self.stats.parts_discarded += len(batch) - len(kept)
        self._buffer = kept + self._buffer
        self._nonempty.set()

    def _failed(self, batch: list[BufferedPart], exc: Exception) -> bool:
        self._keep(batch)
        self.stats.failures += 1
        if isinstance(exc, TimeoutError):
            self.stats.timeouts += 1
        log.warning("parts.flush_failed", parts=len(batch), error=repr(exc))
        return False

    def _written(self, batch: list[BufferedPart], written: int, *, runs: int) -> None:
        self.stats.transactions += 1
        self.stats.parts_written += written
        self.stats.parts_fenced += len(batch) - written
        self.stats.max_chats_per_flush = max(self.stats.max_chats_per_flush, runs)

    async def _write(self, batch: list[BufferedPart]) -> int:
        # One autocommit statement is one transaction (see parts_flush). The server is asked to
        # cancel the statement at the deadline; the outer deadline bounds the wait for the
        # connection too.
        started = time.perf_counter()
        async with asyncio.timeout(self._flush_timeout_s):
            written: int = await self._pool.fetchval(
                Q.sql("parts_flush"),
                [p.token.chat_id for p in batch],
                [p.token.worker_id for p in batch],
                [p.token.generation for p in batch],
                [p.role for p in batch],
                [json_dumps(p.part).decode() for p in batch],
                [p.seq for p in batch],
            )
        instruments.PART_FLUSH_DURATION.observe(time.perf_counter() - started)
        instruments.PART_FLUSH_SIZE.observe(len(batch))
        return written


def _by_run(batch: Iterable[BufferedPart]) -> list[tuple[RunToken, list[BufferedPart]]]:
    """The batch's parts grouped by run, each group in buffer order."""
    groups: dict[RunToken, list[BufferedPart]] = {}
    for part in batch:
        groups.setdefault(part.token, []).append(part)
    return list(groups.items())


async def delete_orphan_parts(pool: asyncpg.Pool) -> int:
    """Remove live parts that belong to no run in progress; returns how many."""
    count: int = await pool.fetchval(Q.sql("parts_delete_orphans"))
    return count
