"""Shared step-context reads (app/engine/context_reader.py): the reads of runs that start
together share one statement, each chat gets its own context, and a chat that is gone reads as
None."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.engine.context_reader import StepContextReader
from tests import factories
from tests.conditions import wait_for
from tests.engine_harness import batching


@pytest.fixture
async def reader(pool: asyncpg.Pool) -> AsyncIterator[StepContextReader]:
    async with batching(StepContextReader(pool)) as reader:
        yield reader


async def test_reads_that_wait_together_share_one_statement(
    database_url: str, conn: asyncpg.Connection, reader: StepContextReader
) -> None:
    chats = []
    for n in range(5):
        chat = await factories.create_chat(conn, status="running", worker_id=uuid.uuid4())
        await factories.create_message(conn, chat_id=chat["id"], text=f"question {n}")
        chats.append(chat["id"])
    gone = uuid.uuid4()

    # The first read waits behind a lock on the model configs; the others arrive meanwhile and
    # must form the next batch: one statement for five reads.
    locker = await asyncpg.connect(database_url)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE chat_model_configs IN ACCESS EXCLUSIVE MODE")
            first = asyncio.create_task(reader.read(chats[0]))

            async def blocked() -> bool:
                waiting: int = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                )
                return waiting > 0

            waits: bool = await wait_for(blocked, message="the first read waits on the lock")
            assert waits
            others = [asyncio.create_task(reader.read(chat_id)) for chat_id in [*chats[1:], gone]]
            await wait_for(lambda: reader.queued == len(others), message="batch queued")
    finally:
        await locker.close()
    contexts = await asyncio.gather(first, *others)

    assert reader.stats.statements == 2
    assert reader.stats.reads == 6
    assert contexts[-1] is None
    for n, (chat_id, context) in enumerate(zip(chats, contexts, strict=False)):
        assert context is not None and context.chat.id == chat_id
        assert [m.role for m in context.messages] == ["user"]
        assert context.messages[0].content == [{"type": "text", "text": f"question {n}"}]
