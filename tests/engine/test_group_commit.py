"""Group commit of the runs' step writes (app/engine/group_commit.py): several runs' writes in
one transaction, each still fenced and in its chat's order, one bad write never failing the
others, and a write withdrawn by a caller that gave up before its batch began."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.engine.group_commit import GroupCommitter
from app.errors import FencedOut
from app.providers.base import Usage
from app.state.runs import RunToken, StepRecord, StepWrite, StepWritten
from tests import factories
from tests.conditions import wait_for
from tests.engine_harness import batching
from tests.faults.chat_lock import chat_row_locked

WORKER = uuid.uuid4()

TOOL_STEP = StepRecord(
    assistant_content=[{"type": "tool_call", "id": "c1", "name": "add", "args": {}}],
    tool_results=[{"type": "tool_result", "tool_call_id": "c1", "name": "add", "result": 3}],
    usage=Usage(input_tokens=5, output_tokens=1),
    cost_micros=3,
)
FINAL_STEP = StepRecord(assistant_content=[{"type": "text", "text": "done"}])


async def _running(conn: asyncpg.Connection, count: int) -> list[RunToken]:
    tokens = []
    for _ in range(count):
        chat = await factories.create_chat(conn, status="running", worker_id=WORKER)
        await factories.create_message(conn, chat_id=chat["id"], text="question")
        await conn.execute("UPDATE chats SET generation = 1 WHERE id = $1", chat["id"])
        tokens.append(RunToken(chat["id"], WORKER, 1))
    return tokens


@pytest.fixture
async def committer(pool: asyncpg.Pool) -> AsyncIterator[GroupCommitter]:
    async with batching(GroupCommitter(pool)) as committer:
        yield committer


async def _history(conn: asyncpg.Connection, chat_id: uuid.UUID) -> list[str]:
    rows = await conn.fetch(
        "SELECT role FROM chat_messages WHERE chat_id = $1 ORDER BY id", chat_id
    )
    return [row["role"] for row in rows]


@contextlib.asynccontextmanager
async def _first_batch_blocked(
    database_url: str, conn: asyncpg.Connection, committer: GroupCommitter, token: RunToken
) -> AsyncIterator[asyncio.Task[StepWritten]]:
    """The committer's transaction for `token`'s write waits behind a lock held on its row, so
    the writes handed over meanwhile form the next batch. Yields the blocked write; the lock is
    released when the block exits."""
    async with chat_row_locked(database_url, token.chat_id) as holder:
        first = asyncio.create_task(committer.write(StepWrite(token, FINAL_STEP, None, True)))
        holder_pid = await holder.fetchval("SELECT pg_backend_pid()")

        async def blocked() -> bool:
            waiting: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))",
                holder_pid,
            )
            return waiting > 0

        waits: bool = await wait_for(blocked, message="the first batch waits on the lock")
        assert waits
        yield first


async def test_writes_that_wait_together_commit_together_each_in_its_chats_order(
    database_url: str, conn: asyncpg.Connection, committer: GroupCommitter
) -> None:
    first, *others = await _running(conn, 6)
    for token in others[:3]:
        await factories.create_queued_message(conn, chat_id=token.chat_id, text="next")
    # The first write's transaction waits behind a lock; the others arrive meanwhile and must
    # form the next batch: one transaction for five writes of five runs.
    async with _first_batch_blocked(database_url, conn, committer, first) as lone:
        batch = [
            asyncio.create_task(committer.write(StepWrite(token, TOOL_STEP, None, ends_turn=n < 3)))
            for n, token in enumerate(others)
        ]
        await wait_for(lambda: committer.queued == len(others), message="batch queued")
    written = await asyncio.gather(lone, *batch)

    assert committer.stats.transactions == 2
    assert committer.stats.writes == 6
    assert written[0].chat.status == "waiting" and written[0].next_message is None
    for n, (token, outcome) in enumerate(zip(others, written[1:], strict=True)):
        if n < 3:  # ended the turn; the queued message continues the run
            assert outcome.next_message is not None and outcome.chat.status == "running"
            assert await _history(conn, token.chat_id) == ["user", "assistant", "tool", "user"]
        else:  # a persisted tool step: the turn goes on, the row untouched
            assert outcome.next_message is None and outcome.chat.status == "running"
            assert await _history(conn, token.chat_id) == ["user", "assistant", "tool"]
        assert [m.role for m in outcome.messages] == ["assistant", "tool"]


async def test_a_fenced_out_write_fails_alone(
    conn: asyncpg.Connection, committer: GroupCommitter
) -> None:
    kept, lost = await _running(conn, 2)
    await conn.execute("UPDATE chats SET generation = 2 WHERE id = $1", lost.chat_id)

    outcomes = await asyncio.gather(
        committer.write(StepWrite(kept, FINAL_STEP, None, ends_turn=True)),
        committer.write(StepWrite(lost, FINAL_STEP, None, ends_turn=True)),
        return_exceptions=True,
    )

    assert not isinstance(outcomes[0], BaseException) and outcomes[0].chat.status == "waiting"
    assert isinstance(outcomes[1], FencedOut)
    assert await _history(conn, lost.chat_id) == ["user"]
    assert await conn.fetchval("SELECT status FROM chats WHERE id = $1", lost.chat_id) == "running"


async def test_a_write_the_database_refuses_fails_without_failing_its_batch(
    database_url: str, conn: asyncpg.Connection, committer: GroupCommitter
) -> None:
    blocker, good, bad = await _running(conn, 3)
    missing_config = uuid.uuid4()  # the messages' foreign key refuses it
    async with _first_batch_blocked(database_url, conn, committer, blocker) as first:
        writes = [
            asyncio.create_task(committer.write(StepWrite(good, FINAL_STEP, None, True))),
            asyncio.create_task(committer.write(StepWrite(bad, FINAL_STEP, missing_config, True))),
        ]
        await wait_for(lambda: committer.queued == 2, message="batch queued")
    await first
    outcomes = await asyncio.gather(*writes, return_exceptions=True)

    assert isinstance(outcomes[1], asyncpg.ForeignKeyViolationError)
    assert not isinstance(outcomes[0], BaseException) and outcomes[0].chat.status == "waiting"
    assert committer.stats.isolated_retries == 1
    assert await _history(conn, good.chat_id) == ["user", "assistant"]
    assert await _history(conn, bad.chat_id) == ["user"]
    assert await conn.fetchval("SELECT status FROM chats WHERE id = $1", bad.chat_id) == "running"


async def test_a_caller_that_gives_up_before_its_batch_began_writes_nothing(
    database_url: str, conn: asyncpg.Connection, committer: GroupCommitter
) -> None:
    blocker, withdrawn = await _running(conn, 2)
    async with _first_batch_blocked(database_url, conn, committer, blocker) as first:
        gave_up = asyncio.create_task(committer.write(StepWrite(withdrawn, FINAL_STEP, None, True)))
        await wait_for(lambda: committer.queued == 1, message="write queued")
        gave_up.cancel()
        await asyncio.wait({gave_up})
    await first
    # The committer has taken (and skipped) the withdrawn write once the queue is empty.
    await wait_for(lambda: not committer.queued, message="queue drained")

    assert gave_up.cancelled()
    assert committer.stats.writes == 1
    assert await _history(conn, withdrawn.chat_id) == ["user"]


async def test_without_its_task_the_committer_writes_each_write_alone(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    (token,) = await _running(conn, 1)
    committer = GroupCommitter(pool)  # never run: e.g. a replica that is stopping

    outcome = await committer.write(StepWrite(token, FINAL_STEP, None, ends_turn=True))

    assert outcome.chat.status == "waiting"
    assert committer.stats.transactions == 0
