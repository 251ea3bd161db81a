"""The worker's fenced transitions (app/state/runs.py) against a real database, with no
replica."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from app.engine import parts
from app.errors import FencedOut
from app.providers.base import Usage
from app.state import runs
from app.state.model import Chat
from app.state.runs import RunToken, StepRecord
from tests import factories
from tests.notifications import NotificationRecorder

WORKER = uuid.UUID("00000000-0000-0000-0000-00000000aaaa")
OTHER_WORKER = uuid.UUID("00000000-0000-0000-0000-00000000bbbb")


async def _pending_chat(conn: asyncpg.Connection, text: str = "hi") -> asyncpg.Record:
    chat = await factories.create_chat(conn, status="pending")
    await factories.create_message(conn, chat_id=chat["id"], text=text)
    return chat


async def _pending_chat_of(conn: asyncpg.Connection, owner_id: uuid.UUID) -> asyncpg.Record:
    chat = await factories.create_chat(conn, owner_id=owner_id, status="pending")
    await factories.create_message(conn, chat_id=chat["id"])
    return chat


async def _acquired(pool: asyncpg.Pool, conn: asyncpg.Connection) -> Chat:
    chat = await _pending_chat(conn)
    acquired = await runs.acquire(pool, WORKER, 100)
    return next(c for c in acquired if c.id == chat["id"])


async def _counts(conn: asyncpg.Connection, chat_id: uuid.UUID) -> tuple[object, ...]:
    row = await conn.fetchrow(
        """
        SELECT c.status, c.version, c.worker_id, c.generation, c.last_error,
               c.interrupt_requested_at,
               (SELECT count(*) FROM chat_messages m WHERE m.chat_id = c.id) AS messages,
               (SELECT count(*) FROM chat_queued_messages q WHERE q.chat_id = c.id) AS queued,
               (SELECT count(*) FROM chat_stream_parts p WHERE p.chat_id = c.id) AS parts
        FROM chats c WHERE c.id = $1
        """,
        chat_id,
    )
    assert row is not None
    return tuple(row.values())


STEP = StepRecord(
    assistant_content=[{"type": "text", "text": "done"}],
    usage=Usage(input_tokens=10, output_tokens=2),
    cost_micros=7,
)


async def test_acquire_sets_the_run_token_in_one_statement(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    first = await _pending_chat(conn)
    second = await _pending_chat(conn)
    await factories.create_chat(conn, status="waiting")

    acquired = await runs.acquire(pool, WORKER, 10)

    assert {c.id for c in acquired} == {first["id"], second["id"]}
    for chat in acquired:
        row = await conn.fetchrow("SELECT * FROM chats WHERE id = $1", chat.id)
        assert row is not None
        assert row["status"] == "running"
        assert row["worker_id"] == WORKER
        assert row["generation"] == 1
        assert row["started_at"] is not None
        assert row["heartbeat_at"] is not None
        assert row["version"] == 2  # one UPDATE


async def test_acquire_takes_at_most_its_capacity_oldest_first(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    chats = [await _pending_chat(conn) for _ in range(3)]
    acquired = await runs.acquire(pool, WORKER, 2)
    assert [c.id for c in acquired] == [chats[0]["id"], chats[1]["id"]]
    assert await runs.acquire(pool, WORKER, 0) == []


async def test_acquire_skips_a_chat_locked_by_someone_else(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    locked = await _pending_chat(conn)
    free = await _pending_chat(conn)
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM chats WHERE id = $1 FOR UPDATE", locked["id"])
            acquired = await runs.acquire(pool, WORKER, 10)
    finally:
        await other.close()
    assert [c.id for c in acquired] == [free["id"]]


async def test_concurrent_acquires_take_disjoint_sets(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    chats = [await _pending_chat(conn) for _ in range(20)]
    results = await asyncio.gather(
        *(runs.acquire(pool, uuid.uuid4(), 3) for _ in range(10)),
    )
    taken = [chat.id for result in results for chat in result]
    assert len(taken) == len(set(taken)) == 20
    assert set(taken) == {c["id"] for c in chats}


async def test_a_flooding_user_does_not_starve_another(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    flooder = await factories.create_user(conn)
    patient = await factories.create_user(conn)
    await factories.create_pending_chats(conn, owner_id=flooder["id"], count=200)
    single = await _pending_chat_of(conn, patient["id"])

    # One slot at a time, as replicas whose capacity frees one run at a time: the second slot
    # already goes to the other user (FIFO by age gave it the 201st).
    order = [
        chat.owner_id
        for _ in range(4)
        for chat in await runs.acquire(pool, WORKER, 1, max_running_per_user=1000)
    ]
    assert order[:2] == [flooder["id"], patient["id"]]
    assert order[2:] == [flooder["id"], flooder["id"]]
    assert await conn.fetchval("SELECT status FROM chats WHERE id = $1", single["id"]) == "running"


async def test_slots_go_round_robin_fewest_running_first(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    users = [(await factories.create_user(conn))["id"] for _ in range(3)]
    await factories.create_pending_chats(conn, owner_id=users[0], count=50)
    await factories.create_pending_chats(conn, owner_id=users[1], count=5)
    await _pending_chat_of(conn, users[2])
    busy = await factories.create_user(conn)  # already runs 2 chats: comes after the others
    for _ in range(2):
        await factories.create_chat(
            conn, owner_id=busy["id"], status="running", worker_id=OTHER_WORKER
        )
    await _pending_chat_of(conn, busy["id"])

    acquired = await runs.acquire(pool, WORKER, 8, max_running_per_user=1000)

    owners = [chat.owner_id for chat in acquired]
    # Round 1: one chat of each idle user; round 2: their second (the user with one chat is
    # done); round 3: the busy user's first competes with the others' third (2 + 1 = 3). Ties
    # go to the oldest waiting chat.
    assert owners == [*users, *users[:2], users[0], users[1], busy["id"]]


async def test_acquire_keeps_each_user_under_the_running_cap(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    heavy = await factories.create_user(conn)
    light = await factories.create_user(conn)
    await factories.create_pending_chats(conn, owner_id=heavy["id"], count=10)
    light_chats = [(await _pending_chat_of(conn, light["id"]))["id"] for _ in range(2)]

    acquired = await runs.acquire(pool, WORKER, 100, max_running_per_user=3)
    assert sum(chat.owner_id == heavy["id"] for chat in acquired) == 3
    assert {chat.id for chat in acquired if chat.owner_id == light["id"]} == set(light_chats)
    assert await runs.acquire(pool, WORKER, 100, max_running_per_user=3) == []

    # One of the heavy user's runs ends: exactly one more of its chats may run.
    done = next(chat for chat in acquired if chat.owner_id == heavy["id"])
    await conn.execute(
        "UPDATE chats SET status = 'waiting', worker_id = NULL WHERE id = $1", done.id
    )
    again = await runs.acquire(pool, WORKER, 100, max_running_per_user=3)
    assert [chat.owner_id for chat in again] == [heavy["id"]]


async def test_concurrent_acquirers_share_the_running_cap(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Replicas acquiring at the same instant compute the user's window over the same queue:
    SKIP LOCKED and the pending re-check split it among them, they do not each take a cap."""
    heavy = await factories.create_user(conn)
    await factories.create_pending_chats(conn, owner_id=heavy["id"], count=100)
    for _ in range(10):
        others = [(await factories.create_user(conn))["id"] for _ in range(5)]
        for other in others:
            await factories.create_pending_chats(conn, owner_id=other, count=3)
    acquirers = await asyncio.gather(*(asyncpg.connect(database_url) for _ in range(8)))
    try:
        for _round in range(5):
            await asyncio.gather(
                *(
                    acquirer.fetch(runs.Q.sql("runs_acquire"), uuid.uuid4(), 7, 5)
                    for acquirer in acquirers
                )
            )
            running = await conn.fetchval(
                "SELECT count(*) FROM chats WHERE owner_id = $1 AND status = 'running'",
                heavy["id"],
            )
            assert running <= 5
            over = await conn.fetchval(
                """
                SELECT count(*) FROM (
                    SELECT owner_id FROM chats WHERE status = 'running'
                    GROUP BY owner_id HAVING count(*) > 5
                ) o
                """
            )
            assert over == 0
    finally:
        await asyncio.gather(*(acquirer.close() for acquirer in acquirers))
    running = await conn.fetchval(
        "SELECT count(*) FROM chats WHERE owner_id = $1 AND status = 'running'", heavy["id"]
    )
    assert running == 5  # every other chat was taken: the cap, not a lack of slots, held it
    assert await conn.fetchval("SELECT count(*) FROM chats WHERE status = 'pending'") == 95


async def test_persist_step_writes_messages_and_deletes_parts_in_one_transaction(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    chat = await _acquired(pool, conn)
    await factories.create_stream_part(conn, chat_id=chat.id, generation=chat.generation)
    recorder = NotificationRecorder(conn)
    await recorder.listen(f"chat:{chat.id}")

    step = StepRecord(
        assistant_content=[{"type": "tool_call", "id": "c1", "name": "add", "args": {}}],
        tool_results=[
            {
                "type": "tool_result",
                "tool_call_id": "c1",
                "name": "add",
                "result": 3,
                "is_error": False,
            }
        ],
        usage=Usage(input_tokens=5, output_tokens=1),
        cost_micros=3,
    )
    messages = await runs.persist_step(pool, runs.token_of(chat), step, model_config_id=None)

    assert [m.role for m in messages] == ["assistant", "tool"]
    assert messages[0].id < messages[1].id
    assert messages[0].input_tokens == 5 and messages[0].cost_micros == 3
    assert messages[1].content == step.tool_results
    assert await conn.fetchval("SELECT count(*) FROM chat_stream_parts") == 0
    notes = await recorder.drain_after_barrier(conn)
    # One message notification for the whole step; the chat row itself did not change.
    assert [n.json()["type"] for n in notes] == ["message"]
    assert notes[0].json()["message_id"] == messages[1].id


async def test_every_write_of_a_run_that_lost_its_chat_is_fenced(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """A chat re-acquired (by another replica) while its first run still goes on: every write
    of the first run raises FencedOut and changes nothing."""
    chat = await _acquired(pool, conn)
    stale = runs.token_of(chat)
    await conn.execute(
        "UPDATE chats SET status = 'pending', worker_id = NULL WHERE id = $1", chat.id
    )
    reacquired = await runs.acquire(pool, OTHER_WORKER, 10)
    assert [c.generation for c in reacquired] == [2]
    await factories.create_queued_message(conn, chat_id=chat.id)
    await factories.create_stream_part(conn, chat_id=chat.id, generation=2)
    before = await _counts(conn, chat.id)

    writes = [
        runs.persist_step(pool, stale, STEP, model_config_id=None),
        runs.end_turn(pool, stale, interrupted=False, step=STEP),
        runs.end_turn(pool, stale, interrupted=True, step=STEP),
        runs.requeue(pool, stale),
        runs.fail(pool, stale, {"kind": "generic"}),
        runs.void_step(pool, stale, {"type": "retry"}),
        runs.check_owned(pool, stale),
    ]
    for write in writes:
        with pytest.raises(FencedOut):
            await write
    assert await _counts(conn, chat.id) == before

    # The same worker with the old generation is fenced too (a replica re-acquiring its own
    # chat after a requeue gets a new generation).
    assert not runs.owns(await runs.read_chat(pool, chat.id), RunToken(chat.id, OTHER_WORKER, 1))
    assert runs.owns(await runs.read_chat(pool, chat.id), RunToken(chat.id, OTHER_WORKER, 2))


async def test_fenced_writes_after_an_edit_and_an_archive(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    edited = await _acquired(pool, conn)
    await conn.execute(
        "UPDATE chats SET status = 'pending', worker_id = NULL WHERE id = $1", edited.id
    )  # what chats.edit_message's chats_reset_to_pending does
    with pytest.raises(FencedOut):
        await runs.end_turn(pool, runs.token_of(edited), interrupted=False, step=STEP)

    archived = await _acquired(pool, conn)
    await conn.execute(
        "UPDATE chats SET status = 'waiting', worker_id = NULL, archived = true WHERE id = $1",
        archived.id,
    )
    with pytest.raises(FencedOut):
        await runs.persist_step(pool, runs.token_of(archived), STEP, model_config_id=None)
    assert await conn.fetchval("SELECT count(*) FROM chat_messages WHERE role = 'assistant'") == 0


async def test_end_turn_with_an_empty_queue_goes_waiting(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    chat = await _acquired(pool, conn)
    outcome = await runs.end_turn(pool, runs.token_of(chat), interrupted=False, step=STEP)
    assert outcome.next_message is None
    assert outcome.chat.status == "waiting"
    assert outcome.chat.worker_id is None
    roles = await conn.fetch(
        "SELECT role FROM chat_messages WHERE chat_id = $1 ORDER BY id", chat.id
    )
    assert [r["role"] for r in roles] == ["user", "assistant"]


async def test_end_turn_pops_the_queue_head_promoted_first_then_fifo(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    chat = await _acquired(pool, conn)
    token = runs.token_of(chat)
    first = await factories.create_queued_message(conn, chat_id=chat.id, text="first")
    await factories.create_queued_message(conn, chat_id=chat.id, text="second")
    third = await factories.create_queued_message(conn, chat_id=chat.id, text="third")
    await conn.execute("UPDATE chat_queued_messages SET promoted = true WHERE id = $1", third["id"])

    texts = []
    for _ in range(3):
        outcome = await runs.end_turn(pool, token, interrupted=False, step=STEP)
        assert outcome.chat.status == "running"
        assert outcome.next_message is not None
        texts.append(outcome.next_message.content[0]["text"])
    assert texts == ["third", "first", "second"]
    assert first["id"] < third["id"]
    final = await runs.end_turn(pool, token, interrupted=False, step=STEP)
    assert final.next_message is None
    assert final.chat.status == "waiting"


async def test_an_interrupted_turn_continues_only_with_a_promoted_message(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    chat = await _acquired(pool, conn)
    token = runs.token_of(chat)
    await factories.create_queued_message(conn, chat_id=chat.id, text="plain")
    promoted = await factories.create_queued_message(conn, chat_id=chat.id, text="now")
    await conn.execute(
        "UPDATE chat_queued_messages SET promoted = true WHERE id = $1", promoted["id"]
    )
    await conn.execute("UPDATE chats SET interrupt_requested_at = now() WHERE id = $1", chat.id)

    partial = StepRecord(assistant_content=[{"type": "text", "text": "echo: par"}])
    outcome = await runs.end_turn(pool, token, interrupted=True, step=partial)
    assert outcome.next_message is not None
    assert outcome.next_message.content == [{"type": "text", "text": "now"}]
    assert outcome.chat.status == "running"
    assert not outcome.chat.interrupt_requested  # the Stop was honoured

    await conn.execute("UPDATE chats SET interrupt_requested_at = now() WHERE id = $1", chat.id)
    outcome = await runs.end_turn(pool, token, interrupted=True)
    assert outcome.next_message is None  # "plain" is not promoted: the Stop wins
    assert outcome.chat.status == "waiting"
    assert not outcome.chat.interrupt_requested
    assert await conn.fetchval("SELECT count(*) FROM chat_queued_messages") == 1
    roles = await conn.fetch(
        "SELECT role FROM chat_messages WHERE chat_id = $1 ORDER BY id", chat.id
    )
    assert [r["role"] for r in roles] == ["user", "assistant", "user"]


async def test_a_stop_that_arrives_as_the_turn_ends_is_honoured(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    chat = await _acquired(pool, conn)
    await factories.create_queued_message(conn, chat_id=chat.id, text="plain")
    await conn.execute("UPDATE chats SET interrupt_requested_at = now() WHERE id = $1", chat.id)
    outcome = await runs.end_turn(pool, runs.token_of(chat), interrupted=False, step=STEP)
    assert outcome.next_message is None
    assert outcome.chat.status == "waiting"


async def test_requeue_gives_the_chat_back_and_drops_its_parts(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    chat = await _acquired(pool, conn)
    await factories.create_stream_part(conn, chat_id=chat.id, generation=chat.generation)
    requeued = await runs.requeue(pool, runs.token_of(chat))
    assert requeued.status == "pending"
    assert requeued.worker_id is None
    assert requeued.generation == chat.generation  # the next acquire bumps it
    assert await conn.fetchval("SELECT count(*) FROM chat_stream_parts") == 0


async def test_requeue_after_a_stop_goes_waiting_or_sends_the_promoted_message(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    stopped = await _acquired(pool, conn)
    await conn.execute("UPDATE chats SET interrupt_requested_at = now() WHERE id = $1", stopped.id)
    assert (await runs.requeue(pool, runs.token_of(stopped))).status == "waiting"

    promoted_chat = await _acquired(pool, conn)
    queued = await factories.create_queued_message(conn, chat_id=promoted_chat.id, text="now")
    await conn.execute(
        "UPDATE chat_queued_messages SET promoted = true WHERE id = $1", queued["id"]
    )
    await conn.execute(
        "UPDATE chats SET interrupt_requested_at = now() WHERE id = $1", promoted_chat.id
    )
    released = await runs.requeue(pool, runs.token_of(promoted_chat))
    assert released.status == "pending"
    assert not released.interrupt_requested
    last = await conn.fetchrow(
        "SELECT role, content FROM chat_messages WHERE chat_id = $1 ORDER BY id DESC LIMIT 1",
        promoted_chat.id,
    )
    assert last is not None
    assert (last["role"], json.loads(last["content"])) == (
        "user",
        [{"type": "text", "text": "now"}],
    )


async def test_fail_records_the_classified_error(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    chat = await _acquired(pool, conn)
    error = {"kind": "auth", "provider": "openai", "retryable": False, "message": "bad key"}
    failed = await runs.fail(pool, runs.token_of(chat), error)
    assert failed.status == "error"
    assert failed.worker_id is None
    assert failed.last_error == error


async def test_void_step_replaces_the_parts_with_one_control_part(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    chat = await _acquired(pool, conn)
    for _ in range(3):
        await factories.create_stream_part(conn, chat_id=chat.id, generation=chat.generation)
    part_id = await runs.void_step(pool, runs.token_of(chat), {"type": "retry", "attempt": 1})
    rows = await conn.fetch("SELECT * FROM chat_stream_parts WHERE chat_id = $1", chat.id)
    assert [(r["id"], r["message_role"], json.loads(r["part"])) for r in rows] == [
        (part_id, "system", {"type": "retry", "attempt": 1})
    ]


async def test_orphans_of_gone_replicas_are_requeued_once_under_concurrency(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    gone = uuid.uuid4()
    chats = [await factories.create_chat(conn, status="running", worker_id=gone) for _ in range(10)]
    stopped = chats[0]["id"]
    await conn.execute("UPDATE chats SET interrupt_requested_at = now() WHERE id = $1", stopped)

    async def sweep() -> list[Chat]:
        async with pool.acquire() as sweeper, sweeper.transaction():
            return await runs.requeue_orphans(sweeper, [gone], orphan_grace_s=60)

    results = await asyncio.gather(*(sweep() for _ in range(4)))
    requeued = [chat.id for result in results for chat in result]
    assert sorted(requeued) == sorted(c["id"] for c in chats)  # each exactly once
    rows = await conn.fetch("SELECT id, status FROM chats WHERE worker_id IS NULL")
    statuses: dict[uuid.UUID, str] = {row["id"]: row["status"] for row in rows}
    assert statuses[stopped] == "waiting"
    assert {s for chat_id, s in statuses.items() if chat_id != stopped} == {"pending"}


async def test_a_running_chat_of_no_replica_is_an_orphan_after_the_grace(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    chat = await factories.create_chat(conn, status="running", worker_id=uuid.uuid4())
    await conn.execute("UPDATE chats SET started_at = now() WHERE id = $1", chat["id"])
    async with pool.acquire() as sweeper, sweeper.transaction():
        assert await runs.requeue_orphans(sweeper, [], orphan_grace_s=60) == []
    await conn.execute(
        "UPDATE chats SET started_at = now() - interval '2 minutes' WHERE id = $1", chat["id"]
    )
    async with pool.acquire() as sweeper, sweeper.transaction():
        requeued = await runs.requeue_orphans(sweeper, [], orphan_grace_s=60)
    assert [c.id for c in requeued] == [chat["id"]]


async def test_the_janitor_removes_only_parts_of_no_run_in_progress(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    live = await _acquired(pool, conn)
    live_part = await factories.create_stream_part(
        conn, chat_id=live.id, generation=live.generation
    )
    await factories.create_stream_part(conn, chat_id=live.id, generation=live.generation - 1)
    idle = await factories.create_chat(conn, status="waiting")
    await factories.create_stream_part(conn, chat_id=idle["id"], generation=0)

    assert await parts.delete_orphan_parts(pool) == 2
    remaining = await conn.fetch("SELECT id FROM chat_stream_parts")
    assert [r["id"] for r in remaining] == [live_part["id"]]


async def test_acquire_says_when_chats_were_held_back_by_the_cap(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """No chat_wake says when a capped user's run ends: the flag tells the replica to try again
    then."""
    assert await runs.acquire_fairly(pool, WORKER, 10, max_running_per_user=2) == ([], False)
    heavy = await factories.create_user(conn)
    await factories.create_pending_chats(conn, owner_id=heavy["id"], count=3)
    chats, held_back = await runs.acquire_fairly(pool, WORKER, 10, max_running_per_user=2)
    assert len(chats) == 2 and held_back
    chats, held_back = await runs.acquire_fairly(pool, WORKER, 10, max_running_per_user=2)
    assert chats == [] and held_back
    chats, held_back = await runs.acquire_fairly(pool, WORKER, 10, max_running_per_user=3)
    assert len(chats) == 1 and not held_back
