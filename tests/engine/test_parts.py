"""The coalesced part flusher (app/engine/parts.py): one transaction per window for all chats,
fenced, ordered against the persisting of a step, bounded."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg

from app.engine.parts import PartFlusher
from app.state.runs import RunToken
from tests import factories
from tests.conditions import wait_for
from tests.engine_harness import eventually
from tests.faults.pg_cluster import PgCluster
from tests.faults.tcp_proxy import TcpProxy
from tests.notifications import NotificationRecorder

WORKER = uuid.uuid4()


async def _running(conn: asyncpg.Connection, count: int) -> list[RunToken]:
    tokens = []
    for _ in range(count):
        chat = await factories.create_chat(conn, status="running", worker_id=WORKER)
        await conn.execute("UPDATE chats SET generation = 1 WHERE id = $1", chat["id"])
        tokens.append(RunToken(chat["id"], WORKER, 1))
    return tokens


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


async def test_one_transaction_carries_the_parts_of_every_chat(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    tokens = await _running(conn, 5)
    recorder = NotificationRecorder(conn)
    await recorder.listen(*(f"chat:{t.chat_id}" for t in tokens))
    flusher = PartFlusher(pool)
    for token in tokens:
        await flusher.add(token, "assistant", _text("a"))
        await flusher.add(
            token, "assistant", {"type": "tool_call", "id": "c", "name": "add", "args": {}}
        )
        await flusher.add(
            token,
            "tool",
            {
                "type": "tool_result",
                "tool_call_id": "c",
                "name": "add",
                "result": 1,
                "is_error": False,
            },
        )

    assert await flusher.flush()

    assert flusher.stats.transactions == 1
    assert flusher.stats.parts_written == 15
    assert flusher.stats.max_chats_per_flush == 5
    notes = await recorder.drain_after_barrier(conn)
    # One parts notification per chat for the whole window.
    assert sorted(n.channel for n in notes) == sorted(f"chat:{t.chat_id}" for t in tokens)
    rows = await conn.fetch(
        "SELECT message_role, part FROM chat_stream_parts WHERE chat_id = $1 ORDER BY id",
        tokens[0].chat_id,
    )
    assert [(r["message_role"], json.loads(r["part"])["type"]) for r in rows] == [
        ("assistant", "text"),
        ("assistant", "tool_call"),
        ("tool", "tool_result"),
    ]


async def test_nothing_is_written_while_the_buffer_is_empty(pool: asyncpg.Pool) -> None:
    flusher = PartFlusher(pool)
    assert await flusher.flush()
    assert flusher.stats.transactions == 0


async def test_consecutive_deltas_of_a_chat_are_merged_within_a_window(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    first, second = await _running(conn, 2)
    flusher = PartFlusher(pool)
    for text in ("echo:", " hello", " there"):
        await flusher.add(first, "assistant", _text(text))
    await flusher.add(second, "assistant", _text("x"))
    await flusher.add(first, "assistant", _text(" again"))
    await flusher.flush()
    rows = await conn.fetch(
        "SELECT part FROM chat_stream_parts WHERE chat_id = $1 ORDER BY id", first.chat_id
    )
    assert [json.loads(r["part"]) for r in rows] == [_text("echo: hello there"), _text(" again")]


async def test_parts_of_a_run_that_lost_its_chat_are_not_written(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    owned, requeued, reacquired = await _running(conn, 3)
    await conn.execute(
        "UPDATE chats SET status = 'pending', worker_id = NULL WHERE id = $1", requeued.chat_id
    )
    await conn.execute(
        "UPDATE chats SET generation = 2, worker_id = $2 WHERE id = $1",
        reacquired.chat_id,
        uuid.uuid4(),
    )
    flusher = PartFlusher(pool)
    for token in (owned, requeued, reacquired):
        await flusher.add(token, "assistant", _text("x"))
    await flusher.flush()
    assert flusher.stats.transactions == 1
    assert flusher.stats.parts_fenced == 2
    rows = await conn.fetch("SELECT chat_id FROM chat_stream_parts")
    assert [r["chat_id"] for r in rows] == [owned.chat_id]


async def test_discard_waits_for_the_flush_in_flight_and_drops_the_rest(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    (token,) = await _running(conn, 1)
    flusher = PartFlusher(pool)
    await flusher.add(token, "assistant", _text("in flight"))
    blocker = await asyncpg.connect(database_url)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        # A statement in flight that cannot finish yet: the flush waits on the parts table.
        await blocker.execute("LOCK TABLE chat_stream_parts IN EXCLUSIVE MODE")
        flush = asyncio.create_task(flusher.flush())

        async def flush_waits_on_the_row() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            )

        await eventually(flush_waits_on_the_row, message="the flush blocked on the table")
        await flusher.add(
            token, "assistant", {"type": "tool_call", "id": "c", "name": "n", "args": {}}
        )
        discard = asyncio.create_task(flusher.discard(token))
        await asyncio.sleep(0)  # one scheduling step: discard runs until it blocks on the lock
        assert not discard.done()  # it waits for the flush transaction
        await blocking.commit()
        await discard
        assert flush.done()
    finally:
        await blocker.close()
    # The in-flight flush committed before discard returned; the later part was dropped.
    rows = await conn.fetch("SELECT part FROM chat_stream_parts")
    assert [json.loads(r["part"]) for r in rows] == [_text("in flight")]
    assert flusher.buffered == 0
    await flusher.flush()
    assert await conn.fetchval("SELECT count(*) FROM chat_stream_parts") == 1


async def test_a_full_buffer_makes_runs_wait_for_the_next_flush(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    tokens = await _running(conn, 4)
    flusher = PartFlusher(pool, max_buffered_parts=3)
    for token in tokens[:3]:
        await flusher.add(token, "assistant", _text("x"))
    blocked = asyncio.create_task(flusher.add(tokens[3], "assistant", _text("y")))
    await wait_for(lambda: flusher.full, message="the buffer to be full")
    assert not blocked.done()
    assert flusher.buffered == 3
    await flusher.flush()
    await blocked
    assert flusher.buffered == 1


async def test_the_flusher_task_writes_each_window_once(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    tokens = await _running(conn, 3)
    flusher = PartFlusher(pool, interval_ms=50)
    task = asyncio.create_task(flusher.run())
    try:
        for token in tokens:
            await flusher.add(token, "assistant", _text("x"))
        await wait_for(lambda: flusher.stats.parts_written == 3, message="the window's flush")
        assert flusher.stats.transactions == 1
    finally:
        task.cancel()
        await asyncio.wait({task})


async def test_settle_waits_for_the_windowed_flush_of_the_chats_parts(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    first, second = await _running(conn, 2)
    flusher = PartFlusher(pool, interval_ms=30)
    task = asyncio.create_task(flusher.run())
    try:
        await flusher.add(first, "assistant", _text("all of "))
        await flusher.add(second, "assistant", _text("other"))
        await flusher.add(first, "assistant", _text("it"))
        await flusher.settle(first)
        assert not flusher.holds(first)
        rows = await conn.fetch(
            "SELECT part FROM chat_stream_parts WHERE chat_id = $1", first.chat_id
        )
        assert [json.loads(r["part"]) for r in rows] == [_text("all of "), _text("it")]
        # The other chat's part went in the same window: one statement for both chats.
        assert flusher.stats.transactions == 1
        assert flusher.stats.parts_written == 3
    finally:
        task.cancel()
        await asyncio.wait({task})


async def test_an_urgent_settle_ends_the_window_instead_of_waiting_it_out(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    (token,) = await _running(conn, 1)
    # A window far longer than settle's deadline: only a window cut short writes the part.
    flusher = PartFlusher(pool, interval_ms=600_000)
    task = asyncio.create_task(flusher.run())
    try:
        await flusher.add(token, "assistant", _text("first "))
        await flusher.settle(token, urgent=True)  # the window begins with this flush
        await flusher.add(token, "assistant", _text("stopped"))
        await flusher.settle(token, urgent=True, timeout_s=30)
        rows = await conn.fetch(
            "SELECT part FROM chat_stream_parts WHERE chat_id = $1 ORDER BY id", token.chat_id
        )
        assert [json.loads(r["part"]) for r in rows] == [_text("first "), _text("stopped")]
        assert flusher.stats.transactions == 2
        assert flusher.stats.parts_discarded == 0
    finally:
        task.cancel()
        await asyncio.wait({task})


async def test_settle_drops_the_parts_when_they_cannot_be_written_in_time(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    (token,) = await _running(conn, 1)
    flusher = PartFlusher(pool)  # no flusher task: nothing will write them
    await flusher.add(token, "assistant", _text("lost"))
    await flusher.settle(token, timeout_s=0.05)
    assert flusher.buffered == 0
    assert flusher.stats.parts_discarded == 1
    assert await conn.fetchval("SELECT count(*) FROM chat_stream_parts") == 0


async def test_a_locked_chat_row_does_not_stall_the_parts_of_other_chats(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    busy, other = await _running(conn, 2)
    flusher = PartFlusher(pool)
    await flusher.add(busy, "assistant", _text("busy"))
    await flusher.add(other, "assistant", _text("other"))
    blocker = await asyncpg.connect(database_url)
    try:
        # A user transition holding the row (e.g. POST /messages flooding a running chat).
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM chats WHERE id = $1 FOR UPDATE", busy.chat_id)
            async with asyncio.timeout(10):
                assert await flusher.flush()
            rows = await conn.fetch("SELECT chat_id, part FROM chat_stream_parts ORDER BY id")
            assert [(r["chat_id"], json.loads(r["part"])) for r in rows] == [
                (busy.chat_id, _text("busy")),
                (other.chat_id, _text("other")),
            ]
    finally:
        await blocker.close()


async def test_two_generations_of_one_chat_keep_their_parts_apart(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    (old,) = await _running(conn, 1)
    await conn.execute("UPDATE chats SET generation = 2 WHERE id = $1", old.chat_id)
    new = RunToken(old.chat_id, WORKER, 2)
    flusher = PartFlusher(pool)
    await flusher.add(old, "assistant", _text("old"))
    await flusher.add(new, "assistant", _text("new"))
    assert flusher.holds(old) and flusher.holds(new)
    # The old run ends (it lost its chat): it drops its own parts, never the new run's.
    flusher.drop(old)
    assert not flusher.holds(old)
    assert flusher.holds(new)
    await flusher.add(old, "assistant", _text("late"))
    await flusher.discard(old)
    assert flusher.buffered == 1
    await flusher.settle(new, timeout_s=0.05)  # no flusher task: dropped at the deadline
    assert flusher.buffered == 0
    await flusher.add(new, "assistant", _text("again"))
    assert await flusher.flush()
    rows = await conn.fetch("SELECT generation, part FROM chat_stream_parts")
    assert [(r["generation"], json.loads(r["part"])) for r in rows] == [(2, _text("again"))]


async def test_a_part_the_database_refuses_is_dropped_and_the_rest_is_written(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    poisoned, healthy = await _running(conn, 2)
    flusher = PartFlusher(pool)
    await flusher.add(healthy, "assistant", _text("before"))
    # Bypasses the run's sanitizing (app/text.py): jsonb refuses \u0000.
    await flusher.add(poisoned, "assistant", _text("nul \x00 here"))
    await flusher.add(
        healthy, "assistant", {"type": "tool_call", "id": "c", "name": "n", "args": {}}
    )
    assert await flusher.flush()
    assert flusher.buffered == 0
    assert flusher.stats.parts_rejected == 1
    rows = await conn.fetch("SELECT chat_id, part FROM chat_stream_parts ORDER BY id")
    assert [(r["chat_id"], json.loads(r["part"])["type"]) for r in rows] == [
        (healthy.chat_id, "text"),
        (healthy.chat_id, "tool_call"),
    ]
    # Nothing is left to retry forever.
    assert await flusher.flush()
    assert flusher.stats.transactions == 1


async def test_a_stalled_database_times_the_flush_out_and_keeps_the_parts(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    (token,) = await _running(conn, 1)
    flusher = PartFlusher(pool, flush_timeout_s=0.2)
    await flusher.add(token, "assistant", _text("kept"))
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE chat_stream_parts IN EXCLUSIVE MODE")
            async with asyncio.timeout(10):
                assert not await flusher.flush()  # past its deadline: an outage
            assert flusher.stats.timeouts == 1
            assert flusher.buffered == 1
        async with asyncio.timeout(10):
            assert await flusher.flush()
    finally:
        await blocker.close()
    rows = await conn.fetch("SELECT part FROM chat_stream_parts")
    assert [json.loads(r["part"]) for r in rows] == [_text("kept")]


async def test_discard_waits_for_a_stalled_flush_only_until_its_deadline(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    (token,) = await _running(conn, 1)
    flusher = PartFlusher(pool, flush_timeout_s=5, discard_timeout_s=0.2)
    await flusher.add(token, "assistant", _text("in flight"))
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE chat_stream_parts IN EXCLUSIVE MODE")
            flush = asyncio.create_task(flusher.flush())
            await wait_for(lambda: flusher.holds(token) and not flusher.buffered, message="flush")
            await flusher.add(token, "assistant", _text("buffered"))
            async with asyncio.timeout(10):
                await flusher.discard(token)  # returns while the flush is still stuck
            assert not flush.done()
            assert flusher.buffered == 0
            assert flusher.stats.timeouts == 1
            # The stuck flush then passes its own deadline: the parts of the run that was
            # discarded meanwhile are not put back (the run has moved on).
            async with asyncio.timeout(20):
                assert not await flush
            assert flusher.buffered == 0
        assert await flusher.flush()
    finally:
        await blocker.close()
    assert await conn.fetchval("SELECT count(*) FROM chat_stream_parts") == 0


async def test_a_flush_whose_answer_was_lost_is_retried_without_writing_a_part_twice(
    pg_cluster: PgCluster, pg_proxy: TcpProxy
) -> None:
    # The flush statement reaches the server and commits; its answer never comes back (the
    # connection dies after the commit). The flusher cannot know, keeps the batch and sends it
    # again: each part must still be written once.
    observer = await asyncpg.connect(pg_cluster.dsn)
    # As app/db.create_pool makes them, with a shorter command timeout: it also bounds the wait
    # for the server to acknowledge the cancel of the timed-out flush, an answer that is lost.
    pool = await asyncpg.create_pool(
        pg_cluster.dsn_via(pg_proxy.host, pg_proxy.port),
        min_size=1,
        max_size=1,
        command_timeout=2.0,
    )
    assert pool is not None
    try:
        (token,) = await _running(observer, 1)
        flusher = PartFlusher(pool, flush_timeout_s=1.0)
        await flusher.add(token, "assistant", _text("first "))
        assert await flusher.flush()  # the statement is prepared: next time it runs at once
        await flusher.add(token, "assistant", _text("once "))
        pg_proxy.lose_answers()
        async with asyncio.timeout(30):
            assert not await flusher.flush()  # committed, but the flusher cannot tell
        committed = await observer.fetchval("SELECT count(*) FROM chat_stream_parts")
        assert committed == 2
        await flusher.add(token, "assistant", _text("more"))  # not merged into the sent part
        async with asyncio.timeout(30):
            while not await flusher.flush():
                pass
    finally:
        pool.terminate()
    rows = await observer.fetch("SELECT part FROM chat_stream_parts ORDER BY id")
    await observer.close()
    assert [json.loads(r["part"])["text"] for r in rows] == ["first ", "once ", "more"]


async def test_offer_buffers_without_waiting_and_refuses_when_full(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    first, second = await _running(conn, 2)
    flusher = PartFlusher(pool, max_buffered_parts=2)
    assert flusher.offer(first, "assistant", _text("a"))
    assert flusher.offer(first, "assistant", _text("b"))  # merged into the part before
    assert flusher.offer(second, "assistant", _text("c"))
    assert not flusher.offer(first, "assistant", _text("d"))  # full: the caller awaits add()
    assert flusher.buffered == 2
    await flusher.flush()
    rows = await conn.fetch("SELECT chat_id, part FROM chat_stream_parts ORDER BY id")
    assert [(r["chat_id"], json.loads(r["part"])) for r in rows] == [
        (first.chat_id, _text("ab")),
        (second.chat_id, _text("c")),
    ]


async def test_parts_json_cannot_encode_fast_are_written_all_the_same(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    (token,) = await _running(conn, 1)
    flusher = PartFlusher(pool)
    result = {"type": "tool_result", "tool_call_id": "c", "name": "n", "is_error": False}
    await flusher.add(token, "tool", result | {"result": 2**70})  # beyond 64 bits
    await flusher.add(token, "tool", result | {"result": "ünïcode"})
    await flusher.flush()
    rows = await conn.fetch("SELECT part FROM chat_stream_parts ORDER BY id")
    assert [json.loads(r["part"])["result"] for r in rows] == [2**70, "ünïcode"]
