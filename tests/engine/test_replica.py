"""The replica engine in-process (app/engine/replica.py): lifecycle, acquire triggers, capacity,
liveness and failover, graceful shutdown, and many chats on two replicas."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from app.engine.liveness import LIVENESS_LOCK_NAMESPACE, lock_key
from app.engine.replica import Replica
from app.metrics import engine_metrics, render
from app.state import chats
from app.state.model import Owner
from tests import engine_harness, factories

LONG_TEXT = " ".join(f"word{i}" for i in range(60))


async def _lock_holder(pool: asyncpg.Pool, replica_id: uuid.UUID) -> int | None:
    """The backend pid holding a replica's liveness lock, read from pg_locks."""
    pid: int | None = await pool.fetchval(
        """
        SELECT pid FROM pg_locks
        WHERE locktype = 'advisory' AND classid = $1::int::oid AND objid = $2::int::oid
          AND objsubid = 2 AND granted
        """,
        LIVENESS_LOCK_NAMESPACE,
        lock_key(replica_id),
    )
    return pid


async def _replica_ids(pool: asyncpg.Pool) -> set[uuid.UUID]:
    return {row["id"] for row in await pool.fetch("SELECT id FROM chat_replicas")}


async def _assistant_count(pool: asyncpg.Pool, chat_id: uuid.UUID) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM chat_messages WHERE chat_id = $1 AND role = 'assistant'", chat_id
    )
    return count


async def _create_silently(pool: asyncpg.Pool, owner: Owner, text: str) -> uuid.UUID:
    """A pending chat whose creation sends no notification (triggers off for this session), so
    only the fallback poll or a resync can find it."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        chat = await factories.create_chat(conn, owner_id=owner.user_id, status="pending")
        await factories.create_message(conn, chat_id=chat["id"], text=text)
    chat_id: uuid.UUID = chat["id"]
    return chat_id


async def test_a_constructed_replica_is_passive(database_url: str, pool: asyncpg.Pool) -> None:
    async with engine_harness.running_listener(database_url) as listener:
        replica = Replica(
            settings=engine_harness.settings(), pool=pool, listener=listener, dsn=database_url
        )
        assert await _replica_ids(pool) == set()
        assert not replica.registered
        assert replica.runs == {}
        await replica.stop()  # stopping a replica that never started is a no-op


async def test_start_registers_with_a_held_lock_and_stop_unregisters(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with engine_harness.running_replica(database_url, pool) as replica:
        replica_id = replica.id
        row = await pool.fetchrow("SELECT * FROM chat_replicas WHERE id = $1", replica_id)
        assert row is not None
        assert row["pid"] > 0
        assert await _lock_holder(pool, replica_id) is not None
        heartbeat = row["heartbeat_at"]

        async def heartbeated() -> bool:
            later = await pool.fetchval(
                "SELECT heartbeat_at FROM chat_replicas WHERE id = $1", replica_id
            )
            return bool(later > heartbeat)

        await engine_harness.eventually(heartbeated, message="a heartbeat")
    assert await _replica_ids(pool) == set()
    assert await _lock_holder(pool, replica_id) is None


async def test_a_replica_runs_at_most_its_capacity(database_url: str, pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=20)
    async with engine_harness.running_replica(database_url, pool, max_concurrent_runs=2) as replica:
        created = [
            (await chats.create_chat(pool, owner, "a b c d", model_config_id=slow))[0]
            for _ in range(6)
        ]
        for chat in created:
            await engine_harness.wait_status(pool, chat.id, "waiting")
    assert replica.stats.max_running == 2
    assert replica.stats.run_ends == {"waiting": 6}
    for chat in created:
        assert await _assistant_count(pool, chat.id) == 1


async def test_a_user_at_the_running_cap_gets_the_next_slot_when_a_run_ends(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """max_running_chats_per_user: one chat of the user runs at a time, the others wait; the
    end of a run lets the next one in at once (no chat_wake says so: the poll is 10 minutes)."""
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=20)
    async with engine_harness.running_replica(
        database_url, pool, max_running_chats_per_user=1, acquire_poll_interval_s=600
    ) as replica:
        created = [
            (await chats.create_chat(pool, owner, "a b c", model_config_id=slow))[0]
            for _ in range(3)
        ]
        for chat in created:
            await engine_harness.wait_status(pool, chat.id, "waiting", timeout_s=20)
    assert replica.stats.max_running == 1
    assert replica.stats.run_ends == {"waiting": 3}


async def test_the_fallback_poll_finds_a_chat_whose_wake_was_lost(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool, acquire_poll_interval_s=0.2):
        chat_id = await _create_silently(pool, owner, "polled")
        await engine_harness.wait_status(pool, chat_id, "waiting")
    assert await _assistant_count(pool, chat_id) == 1


async def test_a_listener_resync_makes_the_replica_acquire(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(
        database_url, pool, acquire_poll_interval_s=600
    ) as replica:
        chat_id = await _create_silently(pool, owner, "after a reconnect")
        old_pid = replica.listener.backend_pid()
        assert old_pid is not None
        await pool.execute("SELECT pg_terminate_backend($1)", old_pid)
        await engine_harness.wait_status(pool, chat_id, "waiting", timeout_s=20)
    assert await _assistant_count(pool, chat_id) == 1


async def test_chats_of_a_replica_whose_lock_is_free_are_requeued_and_answered(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    dead = uuid.uuid4()
    await factories.create_replica_row(pool, replica_id=dead)
    async with pool.acquire() as conn:
        orphaned = []
        for text in ("one", "two"):
            chat = await factories.create_chat(
                conn, owner_id=owner.user_id, status="running", worker_id=dead
            )
            await factories.create_message(conn, chat_id=chat["id"], text=text)
            orphaned.append(chat["id"])
        stopped = await factories.create_chat(
            conn, owner_id=owner.user_id, status="running", worker_id=dead
        )
        await factories.create_message(conn, chat_id=stopped["id"], text="stop me")
        await conn.execute(
            "UPDATE chats SET interrupt_requested_at = now() WHERE id = $1", stopped["id"]
        )
    async with engine_harness.running_replica(database_url, pool) as replica:
        for chat_id in orphaned:
            done = await engine_harness.wait_status(pool, chat_id, "waiting")
            assert done.generation == 1
            assert await _assistant_count(pool, chat_id) == 1
        assert dead not in await _replica_ids(pool)
        assert replica.stats.replicas_swept == 1
    stopped_row = await engine_harness.chat_row(pool, stopped["id"])
    assert stopped_row.status == "waiting"
    assert await _assistant_count(pool, stopped["id"]) == 0


async def test_a_stale_replica_holding_its_lock_is_swept_a_fresh_one_is_not(
    database_url: str, pool: asyncpg.Pool
) -> None:
    stuck, healthy = uuid.uuid4(), uuid.uuid4()
    holder = await asyncpg.connect(database_url)
    try:
        for replica_id in (stuck, healthy):
            assert await holder.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", LIVENESS_LOCK_NAMESPACE, lock_key(replica_id)
            )
        await factories.create_replica_row(
            pool, replica_id=stuck, hostname="stuck", heartbeat_age_s=3600
        )
        await factories.create_replica_row(pool, replica_id=healthy, hostname="healthy", pid=2)
        async with pool.acquire() as conn:
            chat = await factories.create_chat(conn, status="running", worker_id=stuck)
        async with engine_harness.running_listener(database_url) as listener:
            sweeper = Replica(
                settings=engine_harness.settings(stale_threshold_s=30),
                pool=pool,
                listener=listener,
                dsn=database_url,
            )
            requeued = await sweeper.sweep()
        assert [c.id for c in requeued] == [chat["id"]]
        assert await _replica_ids(pool) == {healthy}
    finally:
        await holder.close()


async def test_concurrent_sweeps_requeue_each_chat_once(
    database_url: str, pool: asyncpg.Pool
) -> None:
    dead = uuid.uuid4()
    await factories.create_replica_row(pool, replica_id=dead)
    async with pool.acquire() as conn:
        for _ in range(12):
            await factories.create_chat(conn, status="running", worker_id=dead)
    async with engine_harness.running_listener(database_url) as listener:
        sweepers = [
            Replica(
                settings=engine_harness.settings(), pool=pool, listener=listener, dsn=database_url
            )
            for _ in range(3)
        ]
        results = await asyncio.gather(*(s.sweep() for s in sweepers))
    requeued = [chat.id for result in results for chat in result]
    assert len(requeued) == len(set(requeued)) == 12
    assert await pool.fetchval("SELECT count(*) FROM chats WHERE status = 'running'") == 0
    assert await _replica_ids(pool) == set()


async def test_losing_the_liveness_connection_stops_runs_and_registers_anew(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=30)
    async with engine_harness.running_replica(database_url, pool) as replica:
        first_id = replica.id
        chat, _ = await chats.create_chat(pool, owner, LONG_TEXT, model_config_id=slow)
        await engine_harness.wait_parts(pool, chat.id, at_least=2)
        pid = await _lock_holder(pool, first_id)
        assert pid is not None
        await pool.execute("SELECT pg_terminate_backend($1)", pid)

        final = await engine_harness.wait_status(pool, chat.id, "waiting", timeout_s=30)
        assert replica.id != first_id
        assert replica.stats.liveness_losses == 1
        assert replica.stats.run_ends["requeued"] + replica.stats.run_ends["lost"] == 1
        assert await _replica_ids(pool) == {replica.id}
    assert final.generation == 2
    assert await _assistant_count(pool, chat.id) == 1
    history = await engine_harness.history(pool, chat.id)
    assert engine_harness.text_of(history[-1][1]) == "echo: " + LONG_TEXT


async def test_a_replica_declared_dead_stops_its_runs_and_registers_anew(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with engine_harness.running_replica(database_url, pool) as replica:
        first_id = replica.id
        await pool.execute("DELETE FROM chat_replicas WHERE id = $1", first_id)
        await engine_harness.eventually(
            lambda: _registered_as_other(pool, replica, first_id), message="a new registration"
        )
        assert replica.stats.liveness_losses == 1
        assert await _lock_holder(pool, first_id) is None


async def _registered_as_other(pool: asyncpg.Pool, replica: Replica, old: uuid.UUID) -> bool:
    return replica.registered and replica.id != old and replica.id in await _replica_ids(pool)


async def test_graceful_shutdown_gives_chats_back_and_keeps_completed_steps(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=200)
    streaming = [
        (await chats.create_chat(pool, owner, LONG_TEXT, model_config_id=slow))[0] for _ in range(3)
    ]
    crawling = await factories.create_model_config(pool, token_delay_ms=3000)  # mid-answer at stop
    tooling, _ = await chats.create_chat(
        pool, owner, '/tool add {"a": 1, "b": 2}', model_config_id=crawling
    )
    async with engine_harness.running_replica(database_url, pool) as first:
        first_id = first.id
        for chat in streaming:
            await engine_harness.wait_parts(pool, chat.id, at_least=1)

        async def tool_step_persisted() -> bool:
            return [r for r, _ in await engine_harness.history(pool, tooling.id)] == [
                "user",
                "assistant",
                "tool",
            ]

        await engine_harness.eventually(tool_step_persisted, message="the tool step persisted")
        await first.stop()
        assert first.stats.run_ends == {"requeued": 4}
    for chat in [*streaming, tooling]:
        row = await engine_harness.chat_row(pool, chat.id)
        assert (row.status, row.worker_id) == ("pending", None)
        assert await engine_harness.parts_of(pool, chat.id) == []
    assert await _replica_ids(pool) == set()
    assert await _lock_holder(pool, first_id) is None

    fast = await pool.fetchval("SELECT id FROM chat_model_configs WHERE is_default")
    await pool.execute("UPDATE chats SET model_config_id = $1", fast)
    async with engine_harness.running_replica(database_url, pool):
        for chat in [*streaming, tooling]:
            done = await engine_harness.wait_status(pool, chat.id, "waiting")
            assert done.generation == 2
    for chat in streaming:
        assert [r for r, _ in await engine_harness.history(pool, chat.id)] == ["user", "assistant"]
    # The completed tool step was not redone: one tool call, one result, then the answer.
    history = await engine_harness.history(pool, tooling.id)
    assert [r for r, _ in history] == ["user", "assistant", "tool", "assistant"]
    assert engine_harness.text_of(history[-1][1]) == "echo: add returned 3"


async def test_two_replicas_answer_every_chat_exactly_once(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    async with (
        engine_harness.running_replica(database_url, pool) as first,
        engine_harness.running_replica(database_url, pool) as second,
    ):
        created = await asyncio.gather(
            *(chats.create_chat(pool, owner, f"question {i}") for i in range(40))
        )
        conn, recorder = await engine_harness.record_chats(
            database_url, [c.id for c, _ in created[:5]]
        )
        try:
            for chat, _ in created:
                await engine_harness.wait_status(pool, chat.id, "waiting")
            notes = await recorder.drain_after_barrier(conn)
        finally:
            await conn.close()
    total_runs = sum(first.stats.run_ends.values()) + sum(second.stats.run_ends.values())
    assert total_runs == 40
    for index, (chat, _) in enumerate(created):
        history = await engine_harness.history(pool, chat.id)
        assert [(r, engine_harness.text_of(c)) for r, c in history] == [
            ("user", f"question {index}"),
            ("assistant", f"echo: question {index}"),
        ]
    for chat, _ in created[:5]:
        engine_harness.assert_chat_notifications_consistent(
            [n for n in notes if n.channel == f"chat:{chat.id}"],
            await engine_harness.chat_row(pool, chat.id),
        )


async def test_a_crashed_long_lived_task_stops_the_replica_loudly(
    database_url: str, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine_harness.running_listener(database_url) as listener:
        replica = Replica(
            settings=engine_harness.settings(), pool=pool, listener=listener, dsn=database_url
        )

        async def broken() -> None:
            raise RuntimeError("flusher bug")

        monkeypatch.setattr(replica.flusher, "run", broken)
        await replica.start()
        await asyncio.wait({replica.main_task}, timeout=10)
        assert replica.main_task.done()
        with pytest.raises(ExceptionGroup) as raised:
            replica.main_task.result()
        assert raised.group_contains(RuntimeError, match="flusher bug")
        assert await _replica_ids(pool) == set()


async def test_engine_counters_render_as_metrics(database_url: str, pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool) as replica:
        chat, _ = await chats.create_chat(pool, owner, "count me")
        await engine_harness.wait_status(pool, chat.id, "waiting")
    text = render([engine_metrics(replica)]).decode()
    assert 'chatd_run_ends_total{end="waiting"} 1.0' in text
    assert "chatd_runs_acquired_total 1.0" in text
    assert "chatd_part_flushes_total" in text
    assert replica.flusher.stats.transactions >= 1
