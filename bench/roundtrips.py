"""Round trips per chat turn: what one echo turn costs the database, statement by statement.

An in-process replica (the same `Replica`, `Listener` and pool settings as `chatd serve`)
answers chats; every statement sent on its pool is recorded with asyncpg's query logger and
attributed to its named query (sql/queries/*.sql), plus the LISTEN/UNLISTEN commands of the
listener connection and the flush statements of the part flusher. Two shapes:

- `sequential`: one chat at a time (nothing to share: the cost of a lone turn);
- `burst`: many chats committed at once (what the throughput scenario does): statements that
  serve several chats at once (acquire, the part flush) are divided among them.

This is a count, not a timing: it is exact and does not depend on the machine. The times of
the same path are in the throughput and pickup scenarios."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter

import asyncpg

from app.config import Settings
from app.db.connections import create_pool
from app.db.listener import Listener
from app.db.queries import Queries
from app.engine.replica import ENGINE_SERVER_SETTINGS, Replica
from app.service import POOL_MAX_SIZE
from app.state.model import Owner
from bench.chatd_engine import insert_chats, new_owner
from bench.harness import ScenarioResult
from tests.conditions import wait_for

SEQUENTIAL_TURNS = 20
BURST_TURNS = 200

_BY_SQL = {Queries.load().sql(name): name for name in Queries.load().names()}


def _label(query: str) -> str:
    name = _BY_SQL.get(query.strip())
    if name is not None:
        return name
    head = query.strip().rstrip(";").split(None, 1)[0].upper() if query.strip() else "?"
    if "pg_advisory_unlock_all" in query:
        return "pool_reset"  # asyncpg's reset on every release to the pool
    if head in ("BEGIN", "COMMIT", "ROLLBACK"):
        return head.lower()
    return "other: " + " ".join(query.split())[:40]


class StatementLog:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def record(self, record: object) -> None:
        self.counts[_label(str(getattr(record, "query", "")))] += 1

    async def init_connection(self, conn: asyncpg.Connection) -> None:
        conn.add_query_logger(self.record)


async def _turns(
    dsn: str,
    *,
    chats_per_round: int,
    rounds: int,
    log: StatementLog,
    settings: Settings,
) -> tuple[Counter[str], int, int]:
    """Answer `rounds` x `chats_per_round` chats; returns the statement counts of the measured
    part, the listener's round trips (LISTEN/UNLISTEN commands) and the channels they carried."""
    pool = await create_pool(
        dsn,
        min_size=1,
        max_size=POOL_MAX_SIZE,
        server_settings=ENGINE_SERVER_SETTINGS,
        init=log.init_connection,
    )
    listener = Listener(dsn)
    listener_task = asyncio.create_task(listener.run(), name="bench-listener")
    conn = await asyncpg.connect(dsn)
    try:
        await listener.wait_connected()
        replica = Replica(settings=settings, pool=pool, listener=listener, dsn=dsn)
        await replica.start()
        try:
            owner = await new_owner(conn)
            answered = asyncio.Queue[str]()

            def on_owner(_c: object, _p: int, _ch: str, payload: object) -> None:
                if json.loads(str(payload)).get("status") == "waiting":
                    answered.put_nowait("")

            await conn.add_listener(f"chat_owner:{owner.user_id}", on_owner)
            await _answer(conn, owner, chats_per_round, answered)  # warm up the pool's plans
            await wait_for(lambda: not replica.runs, message="the warm-up runs to end")
            log.counts.clear()
            commands_before = listener.stats.commands
            channels_before = listener.stats.listens + listener.stats.unlistens
            for _ in range(rounds):
                await _answer(conn, owner, chats_per_round, answered)
            # Everything of the last turns (their UNLISTENs) has run once the runs are gone.
            await wait_for(lambda: not replica.runs, message="the runs to end")
            counts = Counter(log.counts)
            return (
                counts,
                listener.stats.commands - commands_before,
                listener.stats.listens + listener.stats.unlistens - channels_before,
            )
        finally:
            await replica.stop()
    finally:
        await conn.close()
        listener_task.cancel()
        await asyncio.wait({listener_task})
        await pool.close()


async def _answer(
    conn: asyncpg.Connection, owner: Owner, count: int, answered: asyncio.Queue[str]
) -> None:
    await insert_chats(conn, owner, [uuid.uuid4() for _ in range(count)], "hello there")
    for _ in range(count):
        await asyncio.wait_for(answered.get(), 60)


async def run(dsn: str, result: ScenarioResult) -> None:
    # The poll and the sweeper would add statements unrelated to turns: push them out of the
    # measured window.
    settings = Settings(acquire_poll_interval_s=60.0, liveness_check_interval_s=60.0)
    for shape, per_round, rounds in (
        ("sequential", 1, SEQUENTIAL_TURNS),
        ("burst", BURST_TURNS, 1),
    ):
        log = StatementLog()
        # Room for every chat of a round: no acquire is ever cut short by capacity.
        settings.max_concurrent_runs = max(2 * per_round, 50)
        # One user's burst: the per-user running cap must not cut the acquire short either.
        settings.max_running_chats_per_user = settings.max_concurrent_runs
        counts, commands, channels = await _turns(
            dsn, chats_per_round=per_round, rounds=rounds, log=log, settings=settings
        )
        turns = per_round * rounds
        pool_statements = sum(counts.values())
        result.add(f"{shape}_pool_statements_per_turn", pool_statements / turns, "1")
        result.add(f"{shape}_listener_round_trips_per_turn", commands / turns, "1")
        result.add(f"{shape}_listener_channel_changes_per_turn", channels / turns, "1")
        result.add(f"{shape}_pool_resets_per_turn", counts["pool_reset"] / turns, "1")
        result.add(f"{shape}_part_flushes_per_turn", counts["parts_flush"] / turns, "1")
        if not any(note.startswith(shape) for note in result.notes):  # exact: one run says it
            breakdown = ", ".join(f"{n} {count / turns:.2f}" for n, count in counts.most_common())
            result.notes.append(f"{shape} per turn: {breakdown}")
