"""The replica engine with real `chatd serve` processes on one database: many chats on three
replicas, and the signals a deployment sends (SIGKILL, SIGTERM, SIGSTOP/SIGCONT).

Chats are created through app/state/chats.py on the test's own pool (what the HTTP API calls); the
replicas find them through chat_wake like any other chat. Timings are printed, never asserted."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import uuid

import asyncpg
import pytest

from app.config import Settings
from app.state import chats
from app.state.model import Chat
from tests import engine_harness, factories
from tests.e2e.cluster import Cluster
from tests.e2e.replicas import ReplicaProcess
from tests.notifications import NotificationRecorder, Received

pytestmark = pytest.mark.e2e

LONG_TEXT = " ".join(f"word{i}" for i in range(60))


async def _all_settled(pool: asyncpg.Pool, chat_ids: list[uuid.UUID]) -> bool:
    busy = await pool.fetchval(
        "SELECT count(*) FROM chats WHERE id = ANY($1) AND status IN ('pending', 'running')",
        chat_ids,
    )
    return int(busy) == 0


async def _wait_settled(pool: asyncpg.Pool, chat_ids: list[uuid.UUID], timeout_s: float) -> None:
    await engine_harness.eventually(
        lambda: _all_settled(pool, chat_ids), timeout_s=timeout_s, message="every chat answered"
    )


def _assert_consistent(notes: list[Received], finals: dict[uuid.UUID, Chat]) -> None:
    for chat_id, final in finals.items():
        engine_harness.assert_chat_notifications_consistent(
            [n for n in notes if n.channel == f"chat:{chat_id}"], final
        )


async def _finals(pool: asyncpg.Pool, chat_ids: list[uuid.UUID]) -> dict[uuid.UUID, Chat]:
    return {chat_id: await engine_harness.chat_row(pool, chat_id) for chat_id in chat_ids}


async def _takeover(pool: asyncpg.Pool, chat_id: uuid.UUID, old_generation: int) -> Chat | None:
    chat = await engine_harness.chat_row(pool, chat_id)
    return chat if chat.generation > old_generation and chat.status != "pending" else None


async def _wait_takeover(pool: asyncpg.Pool, chat_id: uuid.UUID, *, timeout_s: float) -> Chat:
    """Until a later generation than the first runs (or ran) the chat."""

    async def taken() -> Chat | None:
        return await _takeover(pool, chat_id, 1)

    return await engine_harness.eventually(
        taken, timeout_s=timeout_s, interval_s=0.01, message="another replica took the chat"
    )


async def test_200_chats_on_3_replicas_are_each_answered_exactly_once(
    cluster: Cluster, database_url: str, pool: asyncpg.Pool
) -> None:
    replicas = [await cluster.start(f"r{i}") for i in range(3)]
    await cluster.wait_ready(*replicas)
    owner = await factories.create_owner(pool)
    texts = [f"question number {i}" for i in range(200)]

    recorder_conn = await asyncpg.connect(database_url)
    try:
        recorder = NotificationRecorder(recorder_conn)
        # The owner's channel carries every status change of every chat of that user.
        await recorder.listen(f"chat_owner:{owner.user_id}")
        loop = asyncio.get_running_loop()
        started = loop.time()
        created = await asyncio.gather(*(chats.create_chat(pool, owner, t) for t in texts))
        chat_ids = [chat.id for chat, _ in created]
        await _wait_settled(pool, chat_ids, timeout_s=120)
        print(f"\n200 chats answered by 3 replicas in {loop.time() - started:.2f}s")
        notes = await recorder.drain_after_barrier(recorder_conn)
    finally:
        await recorder_conn.close()

    rows = await pool.fetch(
        """
        SELECT chat_id, role, content FROM chat_messages
        WHERE chat_id = ANY($1) AND NOT deleted ORDER BY chat_id, id
        """,
        chat_ids,
    )
    by_chat: dict[uuid.UUID, list[tuple[str, str]]] = {}
    for row in rows:
        by_chat.setdefault(row["chat_id"], []).append(
            (row["role"], engine_harness.text_of(json.loads(row["content"])))
        )
    for chat_id, text in zip(chat_ids, texts, strict=True):
        assert by_chat[chat_id] == [("user", text), ("assistant", f"echo: {text}")]
    finals = await _finals(pool, chat_ids)
    assert {chat.status for chat in finals.values()} == {"waiting"}
    assert {chat.generation for chat in finals.values()} == {1}  # acquired once each
    for final in finals.values():
        engine_harness.assert_owner_notifications_consistent(notes, final)
    per_replica = {r.name: r.logs().count("run.ended") for r in replicas}
    print(f"runs per replica: {per_replica}")
    assert sum(per_replica.values()) == 200


async def test_sigkill_of_the_owner_moves_its_chat_to_another_replica(
    cluster: Cluster, database_url: str, pool: asyncpg.Pool
) -> None:
    first, second = await cluster.start("a"), await cluster.start("b")
    await cluster.wait_ready(first, second)
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=100)
    chat, _ = await chats.create_chat(pool, owner, LONG_TEXT, model_config_id=slow)
    conn, recorder = await engine_harness.record_chats(database_url, [chat.id])
    try:
        await engine_harness.wait_parts(pool, chat.id, at_least=2)
        queued = await chats.send_message(pool, owner, chat.id, "and then this", queue_limit=20)
        assert queued.queued is not None
        victim = await cluster.owner_of(chat.id)

        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        victim.signal(signal.SIGKILL)
        # The resumed run may as well answer at full speed (timing is measured up to the
        # takeover only).
        await pool.execute("UPDATE chat_model_configs SET options = '{}' WHERE id = $1", slow)
        await _wait_takeover(pool, chat.id, timeout_s=30)
        print(
            f"\nSIGKILL failover: the chat was running again after {loop.time() - killed_at:.3f}s"
        )

        await _wait_settled(pool, [chat.id], timeout_s=60)
        notes = await recorder.drain_after_barrier(conn)
    finally:
        await conn.close()
    survivor = second if victim is first else first
    history = await engine_harness.history(pool, chat.id)
    assert [(r, engine_harness.text_of(c)) for r, c in history] == [
        ("user", LONG_TEXT),
        ("assistant", "echo: " + LONG_TEXT),
        ("user", "and then this"),
        ("assistant", "echo: and then this"),
    ]
    final = await engine_harness.chat_row(pool, chat.id)
    assert (final.status, final.generation) == ("waiting", 2)
    engine_harness.assert_chat_notifications_consistent(notes, final)
    assert f"chat_id={chat.id}" in survivor.logs()
    assert await pool.fetchval("SELECT count(*) FROM chat_replicas") == 1


async def test_sigterm_hands_every_running_chat_to_the_other_replica(
    cluster: Cluster, database_url: str, pool: asyncpg.Pool
) -> None:
    leaving = await cluster.start("leaving")
    await cluster.wait_ready(leaving)
    owner = await factories.create_owner(pool)
    # Slow enough to be mid-stream whatever the other replica's start-up takes; sped up once
    # the chats have moved.
    slow = await factories.create_model_config(pool, token_delay_ms=1000)
    streaming = [
        (await chats.create_chat(pool, owner, LONG_TEXT, model_config_id=slow))[0] for _ in range(4)
    ]
    # Its tool step is instant; its answer crawls (a minute a word: however slow the start of
    # the other replica, it is mid-answer at SIGTERM).
    crawling = await factories.create_model_config(pool, token_delay_ms=60_000)
    tooling, _ = await chats.create_chat(
        pool, owner, '/tool add {"a": 20, "b": 22}', model_config_id=crawling
    )
    chat_ids = [c.id for c in [*streaming, tooling]]
    conn, recorder = await engine_harness.record_chats(database_url, chat_ids)
    try:
        for chat in streaming:
            await engine_harness.wait_parts(pool, chat.id, at_least=1)

        async def tool_step_persisted() -> bool:
            roles = [r for r, _ in await engine_harness.history(pool, tooling.id)]
            return roles == ["user", "assistant", "tool"]

        await engine_harness.eventually(tool_step_persisted, message="the tool step persisted")
        staying = await cluster.start("staying")
        await cluster.wait_ready(staying)

        for chat_id in chat_ids:
            still = await engine_harness.chat_row(pool, chat_id)
            assert (still.status, still.generation) == ("running", 1), "the test was too slow"
        # The leaving replica's runs have their config; the resumed ones answer at full speed.
        await pool.execute(
            "UPDATE chat_model_configs SET options = '{}' WHERE id = ANY($1)", [slow, crawling]
        )

        loop = asyncio.get_running_loop()
        started = loop.time()
        leaving.signal(signal.SIGTERM)
        assert await leaving.wait_exit(timeout_s=30) == 0
        print(f"\nSIGTERM: the replica exited after {loop.time() - started:.3f}s")
        await _wait_settled(pool, chat_ids, timeout_s=60)
        notes = await recorder.drain_after_barrier(conn)
    finally:
        await conn.close()

    for chat in streaming:
        assert [
            (r, engine_harness.text_of(c)) for r, c in await engine_harness.history(pool, chat.id)
        ] == [
            ("user", LONG_TEXT),
            ("assistant", "echo: " + LONG_TEXT),
        ]
    # The tool step completed before SIGTERM was kept, not redone.
    history = await engine_harness.history(pool, tooling.id)
    assert [r for r, _ in history] == ["user", "assistant", "tool", "assistant"]
    assert engine_harness.text_of(history[-1][1]) == "echo: add returned 42"
    finals = await _finals(pool, chat_ids)
    assert {c.generation for c in finals.values()} == {2}  # each resumed once, on the other
    _assert_consistent(notes, finals)
    logs = leaving.logs()
    assert logs.count("cause=shutdown given_back=True") == 5
    assert "replica.stopped" in logs


async def test_a_replica_stopped_past_the_stale_threshold_loses_its_chats_and_is_fenced(
    cluster: Cluster, database_url: str, pool: asyncpg.Pool
) -> None:
    fast_stale = {"CHATD_STALE_THRESHOLD_S": "1.5"}
    paused = await cluster.start("paused", **fast_stale)
    await cluster.wait_ready(paused)
    owner = await factories.create_owner(pool)
    # Slow enough to be mid-stream whatever the other replica's start-up takes; sped up once
    # the chats have moved.
    slow = await factories.create_model_config(pool, token_delay_ms=1000)
    created = [
        (await chats.create_chat(pool, owner, LONG_TEXT, model_config_id=slow))[0] for _ in range(2)
    ]
    chat_ids = [c.id for c in created]
    conn, recorder = await engine_harness.record_chats(database_url, chat_ids)
    try:
        for chat_id in chat_ids:
            await engine_harness.wait_parts(pool, chat_id, at_least=2)
        other = await cluster.start("other", **fast_stale)
        await cluster.wait_ready(other)

        for chat_id in chat_ids:
            still = await engine_harness.chat_row(pool, chat_id)
            assert (still.status, still.generation) == ("running", 1), "the test was too slow"

        loop = asyncio.get_running_loop()
        paused.signal(signal.SIGSTOP)
        stopped_at = loop.time()
        # The paused replica's runs have their config; the resumed ones answer at full speed.
        await pool.execute("UPDATE chat_model_configs SET options = '{}' WHERE id = $1", slow)
        for chat_id in chat_ids:
            await _wait_takeover(pool, chat_id, timeout_s=30)
        print(f"\nSIGSTOP: chats taken over after {loop.time() - stopped_at:.3f}s")
        paused.signal(signal.SIGCONT)

        # The resumed replica notices it was declared dead and that its runs lost their chats.
        async def runs_stopped() -> bool:
            logs = paused.logs()
            return "replica.liveness_lost" in logs and all(
                re.search(rf"run\.ended .*chat_id={chat_id}", logs) for chat_id in chat_ids
            )

        await engine_harness.eventually(
            runs_stopped, timeout_s=30, message="the paused replica's runs ended"
        )
        await _wait_settled(pool, chat_ids, timeout_s=60)
        notes = await recorder.drain_after_barrier(conn)
    finally:
        await conn.close()

    for chat_id in chat_ids:
        assert [
            (r, engine_harness.text_of(c)) for r, c in await engine_harness.history(pool, chat_id)
        ] == [
            ("user", LONG_TEXT),
            ("assistant", "echo: " + LONG_TEXT),
        ]
        mine = [n.json() for n in notes if n.channel == f"chat:{chat_id}"]
        takeover = next(
            i for i, n in enumerate(mine) if n["type"] == "chat" and n["generation"] == 2
        )
        # Fencing: after the takeover, not one part (nor message) of generation 1 was written.
        late = [n for n in mine[takeover:] if n["type"] == "parts" and n["generation"] == 1]
        assert late == []
    finals = await _finals(pool, chat_ids)
    assert {c.generation for c in finals.values()} == {2}
    _assert_consistent(notes, finals)
    # The paused replica registered again under a new id and is still serving.
    assert paused.process is not None
    await engine_harness.eventually(
        lambda: _registered(pool, paused), timeout_s=30, message="the paused replica re-registered"
    )


async def _registered(pool: asyncpg.Pool, replica: ReplicaProcess) -> bool:
    assert replica.process is not None
    count = await pool.fetchval(
        "SELECT count(*) FROM chat_replicas WHERE pid = $1", replica.process.pid
    )
    return bool(count)


def test_fast_env_names_real_settings() -> None:
    for name in engine_harness.FAST_ENV:
        field = name.removeprefix("CHATD_").lower()
        assert hasattr(Settings(), field), name
