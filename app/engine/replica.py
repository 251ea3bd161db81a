"""The replica engine: acquire loop, liveness (advisory lock + heartbeat), stale sweeper, part
flusher and the supervision of runs, in one TaskGroup (docs/engine.md).

Constructing a `Replica` starts nothing (tests build passive ones). `start()` registers it
(liveness connection, advisory lock, `chat_replicas` row) and starts its long-lived tasks, each
named, in one TaskGroup: a crash of any of them cancels the others and the replica, loudly,
rather than leaving it half alive. `stop()` is the graceful shutdown: stop acquiring, stop every
run with the *shutdown* cause (completed steps are kept, the chats go back to pending), wait up
to `shutdown_grace_s`, disconnect the MCP servers (stdio servers are stopped), unregister.

Liveness. A replica holds a session advisory lock keyed by its id on a dedicated connection
(not from the pool) and heartbeats its row. Every `liveness_check_interval_s` the sweeper of
every replica looks for registered replicas whose lock is free (their session ended) or whose
heartbeat is older than `stale_threshold_s` (connected but stuck), deletes their rows and gives
their running chats back, in one transaction that is safe to run on several replicas at once;
then it ends the waits of requires_action chats whose client did not answer in time.
A replica that loses its own liveness connection, or finds its row deleted, stops its runs (it
can no longer prove ownership) and registers again under a new id."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import NoReturn

import asyncpg

from app.aio import Backoff, wait_event
from app.config import Settings
from app.db.connections import connect, drop_pool_connections
from app.db.failures import is_outage, is_transient
from app.db.listener import Listener
from app.db.queries import transaction
from app.engine import liveness, parts
from app.engine.chatloop import Run, RunDeps, RunEnd, StopCause
from app.engine.context_reader import StepContextReader
from app.engine.group_commit import GroupCommitter
from app.engine.parts import PartFlusher
from app.engine.step import StepStreamer, stream_once
from app.errors import FencedOut
from app.log import get_logger
from app.state import runs
from app.state.model import Chat
from app.tools.mcp import McpClients
from app.tools.registry import ToolRegistry
from app.tools.toolset import ToolCatalog, default_registry

log = get_logger(__name__)

REGISTER_BACKOFF_MAX_S = 2.0
# Bound of the final unregister, and of the wait for an acquire in flight when shutdown begins.
SHUTDOWN_STEP_TIMEOUT_S = 10.0
# Bound of the graceful unregister after liveness was lost: the connection is most likely dead
# (the server restarted, the network is cut), so it is not worth waiting for.
LOST_UNREGISTER_TIMEOUT_S = 2.0
# Bound of one liveness query (heartbeat or keepalive): a black-holed connection never answers,
# and the replica must notice that it can no longer prove ownership (it is also capped at half
# the stale threshold, so a replica notices before the others may declare it dead).
LIVENESS_QUERY_TIMEOUT_S = 5.0
# Bounds of one acquire attempt and one sweep; a stalled database must not wedge either loop.
ACQUIRE_TIMEOUT_S = 10.0
SWEEP_TIMEOUT_S = 10.0
# Backoff of the acquire and sweeper loops while the database is unreachable.
LOOP_BACKOFF_INITIAL_S = 0.1
LOOP_BACKOFF_MAX_S = 2.0
REGISTER_BACKOFF_INITIAL_S = 0.05
# After the shutdown grace, runs still going are cancelled and get this long to unwind.
HARD_CANCEL_WAIT_S = 1.0
# Server settings for the pool a replica uses. A replica that is stopped (SIGSTOP) or stalled
# between two statements of a transaction holds its row locks; the server ends such a
# transaction after this long, so the chats it locked can move on to another replica.
ENGINE_SERVER_SETTINGS = {"idle_in_transaction_session_timeout": "5000"}


@dataclass
class ReplicaStats:
    acquired: int = 0
    acquire_attempts: int = 0
    max_running: int = 0
    run_ends: Counter[str] = field(default_factory=Counter)
    run_crashes: int = 0
    requeued_for_others: int = 0  # chats of gone replicas this replica handed on
    replicas_swept: int = 0
    registrations: int = 0
    liveness_losses: int = 0


class Replica:
    def __init__(
        self,
        *,
        settings: Settings,
        pool: asyncpg.Pool,
        listener: Listener,
        dsn: str,
        tools: ToolRegistry | None = None,
        stream_step: StepStreamer = stream_once,
        hostname: str | None = None,
        address: str = "",
    ) -> None:
        self.settings = settings
        self.id = uuid.uuid4()
        self._pool = pool
        self._listener = listener
        self._dsn = dsn
        self._hostname = hostname or socket.gethostname()
        self._address = address
        self.flusher = PartFlusher(pool, interval_ms=settings.part_flush_interval_ms)
        self.commits = GroupCommitter(pool)
        self.contexts = StepContextReader(pool)
        # This replica's MCP connections (stdio servers are its child processes).
        self.mcp = McpClients(
            call_timeout_s=settings.mcp_call_timeout_s,
            connect_timeout_s=settings.mcp_connect_timeout_s,
            tools_ttl_s=settings.mcp_tools_ttl_s,
            max_servers=settings.mcp_max_servers,
        )
        self._deps = RunDeps(
            pool=pool,
            listener=listener,
            flusher=self.flusher,
            commits=self.commits,
            contexts=self.contexts,
            tools=ToolCatalog(tools if tools is not None else default_registry(), mcp=self.mcp),
            max_steps_per_turn=settings.max_steps_per_turn,
            stream_step=stream_step,
            queue_limit=settings.queue_limit,
            max_children_per_chat=settings.max_children_per_chat,
            requires_action_timeout_s=settings.requires_action_timeout_s,
        )
        # Keyed by run token, not chat id: after an edit the same chat may be re-acquired here
        # (generation + 1) while the old run is still stopping; both are live runs.
        self.runs: dict[runs.RunToken, tuple[Run, asyncio.Task[None]]] = {}
        self.stats = ReplicaStats()
        self._liveness_conn: asyncpg.Connection | None = None
        self._liveness_conn_lost = asyncio.Event()
        self._registered = asyncio.Event()
        self._poke = asyncio.Event()  # "try to acquire now"
        # Pending chats may be waiting that this replica left for lack of capacity (it was
        # full when woken, or took a full batch): a run that ends then tries again at once.
        # Otherwise a run's end costs no acquire statement (the wake of a new pending chat and
        # the fallback poll cover the rest).
        self._backlog = False
        # An acquire failed: its UPDATE may have committed with the answer lost (reconcile).
        self._reconcile_due = False
        self._stop_requested = asyncio.Event()
        self._accepting = True
        self._task_group: asyncio.TaskGroup | None = None
        self._main: asyncio.Task[None] | None = None

    @property
    def main_task(self) -> asyncio.Task[None]:
        assert self._main is not None, "the replica was not started"
        return self._main

    @property
    def listener(self) -> Listener:
        return self._listener

    def server_tool_names(self) -> frozenset[str]:
        """The names of the tools this replica runs: a chat's client tools may not take them
        (the API refuses such a definition)."""
        return frozenset(self._deps.tools.names())

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    def _fields(self) -> dict[str, object]:
        return {"replica_id": self.id}

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Register (liveness lock + row), then start the long-lived tasks."""
        assert self._main is None, "a replica starts once"
        await self._register(first_id=self.id)
        self._main = asyncio.create_task(self._run(), name=f"replica:{self.id}")

    async def stop(self) -> None:
        """Graceful shutdown; returns when the replica is unregistered. Idempotent."""
        if self._main is None:
            return
        self._stop_requested.set()
        await asyncio.wait({self._main})

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as task_group:
                self._task_group = task_group
                long_lived = [
                    task_group.create_task(self.flusher.run(), name="replica-flusher"),
                    task_group.create_task(self.commits.run(), name="replica-group-commit"),
                    task_group.create_task(self.contexts.run(), name="replica-context-reads"),
                    task_group.create_task(self._liveness_loop(), name="replica-liveness"),
                    task_group.create_task(self._sweeper_loop(), name="replica-sweeper"),
                    task_group.create_task(self._wake_loop(), name="replica-wake"),
                    task_group.create_task(self.mcp.run(), name="replica-mcp"),
                    task_group.create_task(self._acquire_loop(), name="replica-acquire"),
                ]
                log.info("replica.started", hostname=self._hostname, **self._fields())
                await self._stop_requested.wait()
                log.info("replica.stopping", running=len(self.runs), **self._fields())
                # No more acquires. The acquire loop is not cancelled mid-query (chats it had
                # just taken would be left running under no run); it ends after the current
                # attempt, and hands back anything that attempt took.
                acquiring = long_lived[-1]
                self._accepting = False
                self._poke.set()
                if not self._registered.is_set():
                    acquiring.cancel()  # waiting for liveness: nothing in flight
                await asyncio.wait({acquiring}, timeout=SHUTDOWN_STEP_TIMEOUT_S)
                await self._stop_runs(StopCause.SHUTDOWN)
                # After the runs: no call is in flight. stdio servers are stopped (bounded).
                await self.mcp.close()
                for task in long_lived:
                    task.cancel()
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.error("replica.crashed", error=repr(exc), exc_info=True, **self._fields())
            raise
        finally:
            self._accepting = False
            self._task_group = None
            await self._unregister()
            log.info("replica.stopped", **self._fields())

    async def _stop_runs(self, cause: StopCause) -> None:
        """Stop every run for `cause` and wait up to the grace period; cancel the rest."""
        entries = list(self.runs.values())
        if not entries:
            return
        for run, _task in entries:
            run.stop(cause)
        tasks = {task for _run, task in entries}
        _done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
        if pending:
            log.warning("replica.runs_cancelled", runs=len(pending), cause=cause.label)
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=HARD_CANCEL_WAIT_S)

    # --- liveness ---------------------------------------------------------------------------

    async def _register(self, *, first_id: uuid.UUID | None = None) -> None:
        """Open the liveness connection, take the lock of a fresh id, then insert the row (in
        that order: a row others can see always has its lock held while its session lives)."""
        conn = await connect(self._dsn)
        try:
            candidate = await liveness.register(
                conn, first_id or uuid.uuid4(), hostname=self._hostname, address=self._address
            )
        except (Exception, asyncio.CancelledError):
            conn.terminate()
            raise
        self._liveness_conn_lost.clear()
        conn.add_termination_listener(lambda _conn: self._liveness_conn_lost.set())
        self._liveness_conn = conn
        self.id = candidate
        self.stats.registrations += 1
        self._registered.set()
        self._poke.set()
        log.info("replica.registered", backend_pid=conn.get_server_pid(), **self._fields())

    async def _unregister(self, *, timeout_s: float = SHUTDOWN_STEP_TIMEOUT_S) -> None:
        """Give back every chat still running under this replica's id, delete its row and end
        the liveness session, in that order. A run that outlived the shutdown grace (cancelled)
        or could not release its chat leaves it running; without this, it would stay running
        until the orphan threshold, since the row the sweepers look for is gone."""
        self._registered.clear()
        conn, self._liveness_conn = self._liveness_conn, None
        if conn is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                async with conn.transaction():
                    released = await runs.requeue_unrun(conn, self.id, [])
                    await liveness.delete_row(conn, self.id)
                await conn.close()  # ends the session: the advisory lock is released
        except (Exception, asyncio.CancelledError) as exc:
            conn.terminate()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("replica.unregister_failed", error=repr(exc), **self._fields())
            return
        for chat in released:
            log.warning(
                "run.released_at_unregister", chat_id=chat.id, status=chat.status, **self._fields()
            )

    async def _liveness_loop(self) -> None:
        backoff = Backoff(initial_s=REGISTER_BACKOFF_INITIAL_S, max_s=REGISTER_BACKOFF_MAX_S)
        while True:
            try:
                await self._hold_liveness()
            except liveness.LivenessLost as exc:
                reason = str(exc)
                outage = exc.outage
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                reason = repr(exc)
                outage = True
            self._registered.clear()
            if outage:
                # The database went away (restart, crash, cut or black-holed network): every
                # pooled connection is suspect. Fresh ones fail fast while it is still away
                # and work as soon as it is back.
                await drop_pool_connections(self._pool)
            self.stats.liveness_losses += 1
            log.error(
                "replica.liveness_lost", reason=reason, running=len(self.runs), **self._fields()
            )
            await self._stop_runs(StopCause.LIVENESS_LOST)
            await self._unregister(timeout_s=LOST_UNREGISTER_TIMEOUT_S)
            while True:
                try:
                    await self._register()
                    backoff.reset()
                    break
                except Exception as exc:
                    if not _is_transient(exc):
                        raise
                    backoff.grow()
                    log.warning(
                        "replica.register_failed", error=repr(exc), retry_in_s=backoff.delay_s
                    )
                    await asyncio.sleep(backoff.delay_s)

    async def _hold_liveness(self) -> NoReturn:
        """Heartbeat the row and check the connection until liveness is lost (raises)."""
        conn = self._liveness_conn
        if conn is None:
            raise liveness.LivenessLost("no liveness connection", outage=True)
        settings = self.settings
        loop = asyncio.get_running_loop()
        query_timeout_s = min(LIVENESS_QUERY_TIMEOUT_S, max(settings.stale_threshold_s / 2, 0.5))
        next_heartbeat = loop.time() + settings.heartbeat_interval_s
        while True:
            wait_s = min(settings.liveness_check_interval_s, next_heartbeat - loop.time())
            if await wait_event(self._liveness_conn_lost, wait_s):
                raise liveness.LivenessLost("liveness connection closed", outage=True)
            async with asyncio.timeout(query_timeout_s):
                if loop.time() >= next_heartbeat:
                    if not await liveness.heartbeat(conn, self.id):
                        raise liveness.LivenessLost(
                            "replica row deleted: declared dead by another replica", outage=False
                        )
                    next_heartbeat = loop.time() + settings.heartbeat_interval_s
                else:
                    await liveness.keepalive(conn)

    # --- the sweeper: requeue the chats of replicas that are gone ----------------------------

    async def _sweeper_loop(self) -> None:
        loop = asyncio.get_running_loop()
        # Orphans (running chats of no replica) and orphan parts only exist after rare races
        # and become eligible after the stale threshold: looking once per threshold is enough.
        next_orphan_check = loop.time()
        backoff = Backoff(initial_s=LOOP_BACKOFF_INITIAL_S, max_s=LOOP_BACKOFF_MAX_S)
        while True:
            await asyncio.sleep(self.settings.liveness_check_interval_s + backoff.delay_s)
            if not self._registered.is_set():
                continue
            try:
                check_orphans = loop.time() >= next_orphan_check
                async with asyncio.timeout(SWEEP_TIMEOUT_S):
                    await self.sweep(orphans=check_orphans)
                    await self.expire_actions()
                    if check_orphans:
                        next_orphan_check = loop.time() + self.settings.stale_threshold_s
                        if removed := await parts.delete_orphan_parts(self._pool):
                            log.info("parts.orphans_deleted", parts=removed, **self._fields())
                backoff.reset()
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                backoff.grow()
                log.warning("replica.sweep_failed", error=repr(exc), **self._fields())

    async def sweep(self, *, orphans: bool = True) -> list[Chat]:
        """One liveness check: find replicas that are gone, delete them and give their running
        chats back; with `orphans`, also the running chats of no replica at all. Returns the
        chats handed on. Costs one query when every replica is alive."""
        stale_s = self.settings.stale_threshold_s
        gone = await liveness.find_gone(self._pool, self.id, stale_s)
        if not gone and not orphans:
            return []
        gone_ids = [row["id"] for row in gone]
        lock_free_ids = [row["id"] for row in gone if row["lock_free"]]
        async with transaction(self._pool) as conn:
            deleted = await liveness.delete_gone(conn, gone_ids, lock_free_ids, stale_s)
            requeued = await runs.requeue_orphans(
                conn,
                deleted,
                orphan_grace_s=stale_s,
                max_failed_runs=self.settings.max_failed_runs,
            )
        if deleted:
            self.stats.replicas_swept += len(deleted)
            for row in gone:
                if row["id"] in deleted:
                    log.warning(
                        "replica.swept",
                        gone_replica_id=row["id"],
                        lock_free=row["lock_free"],
                        stale=row["stale"],
                        **self._fields(),
                    )
        for chat in requeued:
            log.info(
                "run.requeued_for_gone_replica",
                chat_id=chat.id,
                status=chat.status,
                **self._fields(),
            )
        self.stats.requeued_for_others += len(requeued)
        return requeued

    async def expire_actions(self) -> list[Chat]:
        """The time-out of requires_action (docs/requires_action.md): chats whose client did not
        post its tool results before the deadline get error results and their turn ends. Every
        replica looks, every sweep (one probe of a partial index that holds only the chats
        waiting for a client); SKIP LOCKED keeps them from doing the same chat twice."""
        expired = await runs.expire_actions(self._pool)
        for chat in expired:
            log.info("run.action_timed_out", chat_id=chat.id, status=chat.status, **self._fields())
        return expired

    # --- acquiring and running -------------------------------------------------------------

    def accepting(self) -> bool:
        """Whether the replica still takes new chats (False once shutdown began)."""
        return self._accepting

    @property
    def spare_capacity(self) -> int:
        """Capacity left, counted in live runs (a stopping run still holds its slot)."""
        return self.settings.max_concurrent_runs - len(self.runs)

    async def _wake_loop(self) -> None:
        """chat_wake notifications and listener resyncs poke the acquire loop."""
        if not self.settings.acquire_listen:
            log.info("replica.poll_only", interval_s=self.settings.acquire_poll_interval_s)
            return
        async with self._listener.subscribe("chat_wake") as wake:
            async for _event in wake:
                self._poke.set()

    async def _acquire_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(initial_s=LOOP_BACKOFF_INITIAL_S, max_s=LOOP_BACKOFF_MAX_S)
        next_reconcile = loop.time() + self.settings.stale_threshold_s
        while True:
            await self._registered.wait()
            if not self._accepting:
                return
            self._poke.clear()
            try:
                # An acquire whose answer was lost, or a run that could not release its chat,
                # leaves chats running under this id with no run: give them back, after every
                # failure and as a slow backstop.
                if self._reconcile_due or loop.time() >= next_reconcile:
                    await self.reconcile()
                    next_reconcile = loop.time() + self.settings.stale_threshold_s
                await self.acquire()
                backoff.reset()
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                self._reconcile_due = True
                backoff.grow()
                log.warning("replica.acquire_failed", error=repr(exc), **self._fields())
            if not self.accepting():
                return
            # The slow fallback poll covers lost notifications; while the database fails, the
            # backoff keeps this loop from spinning (its sleep counts against the poll interval).
            poll_until = loop.time() + self.settings.acquire_poll_interval_s
            if backoff.delay_s:
                await asyncio.sleep(min(backoff.delay_s, self.settings.acquire_poll_interval_s))
            await wait_event(self._poke, poll_until - loop.time())

    async def reconcile(self) -> list[Chat]:
        """Give back the chats the table says this replica runs but none of its runs drives
        (called from the acquire loop, so no acquire is in flight meanwhile)."""
        worker_id = self.id
        live = [run.token for run, _task in self.runs.values() if run.token.worker_id == worker_id]
        async with asyncio.timeout(ACQUIRE_TIMEOUT_S), transaction(self._pool) as conn:
            released = await runs.requeue_unrun(conn, worker_id, live)
        self._reconcile_due = False
        for chat in released:
            log.warning("run.released_unrun", chat_id=chat.id, status=chat.status, **self._fields())
        return released

    async def acquire(self) -> list[Chat]:
        """Acquire as many pending chats as there is capacity for and start their runs."""
        spare = self.spare_capacity
        if spare <= 0:
            self._backlog = True
            return []
        if not self._accepting or not self._registered.is_set():
            return []
        worker_id = self.id
        self.stats.acquire_attempts += 1
        async with asyncio.timeout(ACQUIRE_TIMEOUT_S):
            chats, held_back = await runs.acquire_fairly(
                self._pool,
                worker_id,
                spare,
                max_running_per_user=self.settings.max_running_chats_per_user,
            )
        # More to take than capacity, or chats left only because their owner is at
        # max_running_chats_per_user: a run's end may let them in (no chat_wake says so).
        self._backlog = len(chats) == spare or held_back
        for chat in chats:
            if worker_id != self.id or not self._registered.is_set() or not self._accepting:
                # Liveness was lost (or shutdown began) while acquiring: a run here could not
                # prove ownership. Give the chat straight back (fenced, so a no-op if another
                # replica's sweeper was faster).
                log.warning(
                    "run.not_started", chat_id=chat.id, generation=chat.generation, **self._fields()
                )
                with contextlib.suppress(FencedOut):
                    await runs.requeue(self._pool, runs.token_of(chat))
                continue
            self._start_run(chat)
        if chats and len(chats) == spare:
            self._poke.set()  # there may be more: try again as soon as capacity frees
        return chats

    def _start_run(self, chat: Chat) -> None:
        task_group = self._task_group
        assert task_group is not None
        run = Run(chat, self._deps)
        task = task_group.create_task(self._supervise(run), name=f"run:{chat.id}:{chat.generation}")
        self.runs[run.token] = (run, task)
        self.stats.acquired += 1
        self.stats.max_running = max(self.stats.max_running, len(self.runs))

    async def _supervise(self, run: Run) -> None:
        """Run one chat. A run that crashes never takes the replica down: a database failure
        gives the chat back (pending), a bug fails the chat (error), both fenced."""
        try:
            try:
                end = await run.execute()
            except Exception as exc:
                self.stats.run_crashes += 1
                log.error(
                    "run.crashed",
                    chat_id=run.chat_id,
                    generation=run.token.generation,
                    error=repr(exc),
                    exc_info=True,
                    **self._fields(),
                )
                end = await self._salvage(run, outage=is_outage(exc))
            self.stats.run_ends[end.value] += 1
        finally:
            current = self.runs.get(run.token)
            if current is not None and current[0] is run:
                del self.runs[run.token]
            if self._backlog:
                self._poke.set()

    async def _salvage(self, run: Run, *, outage: bool) -> RunEnd:
        """Release the chat of a crashed run. A database outage requeues it (it says nothing
        about the chat). Anything else (a bug, a row the database refused, contention) is
        counted by the poison-chat guard: the chat is requeued for another try, and ends in
        `error` (kind "poison") after `max_failed_runs` such runs in a row without progress.
        If even that cannot be written, this replica cannot vouch for its chats any more: it
        drops its liveness, so that the other replicas requeue them, and registers again."""
        backoff_s = 0.2
        for _attempt in range(SALVAGE_ATTEMPTS):
            try:
                if outage:
                    await runs.requeue(self._pool, run.token)
                    return RunEnd.REQUEUED
                chat = await runs.give_back_failed(
                    self._pool, run.token, max_failed_runs=self.settings.max_failed_runs
                )
            except FencedOut:
                return RunEnd.LOST
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                log.warning("run.salvage_failed", chat_id=run.chat_id, error=repr(exc))
                await asyncio.sleep(backoff_s)
                backoff_s *= 2
            else:
                if chat.status == "error":
                    log.error("run.poison_chat", chat_id=run.chat_id, last_error=chat.last_error)
                    return RunEnd.FAILED
                return RunEnd.REQUEUED
        log.error("replica.dropping_liveness", reason="a chat cannot be released", **self._fields())
        conn = self._liveness_conn
        if conn is not None:
            conn.terminate()
        return RunEnd.LOST


SALVAGE_ATTEMPTS = 4


def _is_transient(exc: BaseException) -> bool:
    """Database trouble that may pass: an outage or contention (app/db/), as opposed to a bug."""
    return is_transient(exc)
