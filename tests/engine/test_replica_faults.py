"""The replica engine under database faults (issue 9): every session of the replica killed by
the server (what a restart does to them), an acquire whose answer was lost, a run that outlives
the shutdown grace, and part ids that must never go backwards."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from app.providers.base import ModelRequest, Provider, StreamEvent, TextDelta
from app.providers.retry import RetryInfo
from app.state import chats
from tests import engine_harness, factories

WORDS = " ".join(f"w{i}" for i in range(40))


async def _answers(pool: asyncpg.Pool, chat_id: uuid.UUID) -> list[str]:
    return [
        engine_harness.text_of(content)
        for role, content in await engine_harness.history(pool, chat_id)
        if role == "assistant"
    ]


async def _terminate_all_but(observer: asyncpg.Connection) -> int:
    """End every other session of this database, as a server restart or crash does."""
    killed: int = await observer.fetchval(
        """
        SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
        """
    )
    return killed


async def test_a_replica_whose_every_session_dies_keeps_running_and_answers_each_chat_once(
    database_url: str, pool: asyncpg.Pool
) -> None:
    observer = await asyncpg.connect(database_url)
    try:
        owner = await factories.create_owner(pool)
        slow = await factories.create_model_config(pool, token_delay_ms=15)
        async with engine_harness.running_replica(database_url, pool) as replica:
            created = [
                (await chats.create_chat(pool, owner, WORDS, model_config_id=slow))[0]
                for _ in range(6)
            ]
            for chat in created:
                await engine_harness.wait_parts(pool, chat.id)
            for round_number in (1, 2):
                assert await _terminate_all_but(observer) > 0

                registrations = round_number + 1

                async def reconnected() -> bool:
                    return (
                        replica.stats.registrations >= registrations  # noqa: B023
                        and replica.registered
                        and replica.listener.connected
                    )

                await engine_harness.eventually(reconnected, message="the replica registered again")
                assert not replica.main_task.done()

            async def all_waiting() -> bool:
                statuses = await observer.fetch(
                    "SELECT status FROM chats WHERE id = ANY($1::uuid[])",
                    [c.id for c in created],
                )
                return all(row["status"] == "waiting" for row in statuses)

            await engine_harness.eventually(
                all_waiting, timeout_s=60, message="every chat answered"
            )
            assert not replica.main_task.done(), "the replica stopped"
        for chat in created:
            rows = await observer.fetch(
                "SELECT content FROM chat_messages WHERE chat_id = $1 AND role = 'assistant'"
                " AND NOT deleted",
                chat.id,
            )
            assert len(rows) == 1, f"chat {chat.id} has {len(rows)} answers"
        errors = await observer.fetchval("SELECT count(*) FROM chats WHERE status = 'error'")
        assert errors == 0
    finally:
        await observer.close()


async def test_a_chat_acquired_with_its_answer_lost_is_given_back_and_answered(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool, stale_threshold_s=2.0) as replica:
        # What runs_acquire leaves when its connection drops after the commit: the chat is
        # running under this replica's id, and the replica never saw the row.
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")  # no wake
            lost = await factories.create_chat(
                conn, owner_id=owner.user_id, status="running", worker_id=replica.id
            )
            await factories.create_message(conn, chat_id=lost["id"], text="lost acquire")
        done = await engine_harness.wait_status(pool, lost["id"], "waiting", timeout_s=30)
        assert done.generation == 1  # given back (0 -> pending), then acquired for real
    assert await _answers(pool, lost["id"]) == ["echo: lost acquire"]


async def test_reconcile_leaves_the_chats_of_live_runs_alone(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=20)
    async with engine_harness.running_replica(database_url, pool) as replica:
        chat, _message = await chats.create_chat(pool, owner, WORDS, model_config_id=slow)
        await engine_harness.wait_parts(pool, chat.id)
        assert await replica.reconcile() == []
        assert (await engine_harness.chat_row(pool, chat.id)).status == "running"
        await engine_harness.wait_status(pool, chat.id, "waiting", timeout_s=30)
    assert len(await _answers(pool, chat.id)) == 1


def _slow_to_stop(started: asyncio.Event) -> Callable[..., AsyncIterator[StreamEvent]]:
    """A provider stream that, once cancelled, takes forever to wind down (until cancelled
    again): a run of it outlives any shutdown grace."""

    async def stream_step(
        provider: Provider,
        request: ModelRequest,
        *,
        on_retry: Callable[[RetryInfo], Awaitable[None]],
    ) -> AsyncIterator[StreamEvent]:
        del provider, request, on_retry
        yield TextDelta("partial ")
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.Event().wait()  # cleaning up slowly; only a second cancel ends it
            raise

    return stream_step


async def test_a_run_cancelled_after_the_shutdown_grace_leaves_its_chat_pending(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    started = asyncio.Event()
    async with engine_harness.running_replica(
        database_url, pool, shutdown_grace_s=0.2, stream_step=_slow_to_stop(started)
    ) as replica:
        chat, _message = await chats.create_chat(pool, owner, "never finishes")
        async with asyncio.timeout(15):
            await started.wait()
        await replica.stop()
    row = await engine_harness.chat_row(pool, chat.id)
    assert (row.status, row.worker_id) == ("pending", None)


async def test_part_ids_come_from_a_logged_sequence_that_registration_moves_ahead(
    database_url: str, pool: asyncpg.Pool
) -> None:
    # Crash recovery resets the sequences of UNLOGGED tables (and empties the tables); a logged
    # sequence is restored from WAL, and each registration jumps far past anything handed out.
    default = await pool.fetchval(
        "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d"
        " JOIN pg_attribute a ON (a.attrelid, a.attnum) = (d.adrelid, d.adnum)"
        " WHERE d.adrelid = 'chat_stream_parts'::regclass AND a.attname = 'id'"
    )
    assert default == "nextval('chat_stream_part_ids'::regclass)"
    persistence = await pool.fetchval(
        "SELECT relpersistence::text FROM pg_class WHERE relname = 'chat_stream_part_ids'"
    )
    assert persistence == "p"  # permanent (logged), unlike the table
    before = await pool.fetchval("SELECT last_value FROM chat_stream_part_ids")
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool):
        chat, _message = await chats.create_chat(pool, owner, "one part")
        await engine_harness.wait_status(pool, chat.id, "waiting")
    after = await pool.fetchval("SELECT last_value FROM chat_stream_part_ids")
    assert after >= before + 2**24
