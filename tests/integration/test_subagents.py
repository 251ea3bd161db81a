"""Sub-agents at the data level: spawning, reaching only one's own children, waiting on a
child's notifications, and Stop/archive of a parent reaching its children."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app import chats, subagents
from app.chats import Owner
from app.listener import Listener
from app.subagents import Parent, SubagentError
from tests import engine, factories


@pytest.fixture
async def listener(database_url: str) -> AsyncIterator[Listener]:
    async with engine.running_listener(database_url) as running:
        yield running


async def _parent(pool: asyncpg.Pool) -> Parent:
    async with pool.acquire() as conn:
        user = await factories.create_user(conn)
    owner = Owner(user_id=user["id"], organization_id=user["organization_id"])
    chat, _ = await chats.create_chat(pool, owner, "parent task")
    return Parent(chat_id=chat.id, owner=owner, is_child=False)


async def _finish(pool: asyncpg.Pool, chat_id: uuid.UUID, answer: str) -> None:
    """What a worker's finished turn leaves behind: an assistant message, status waiting."""
    async with pool.acquire() as conn, conn.transaction():
        await factories.create_message(conn, chat_id=chat_id, role="assistant", text=answer)
        await conn.execute("UPDATE chats SET status = 'waiting' WHERE id = $1", chat_id)


async def test_spawn_creates_a_pending_child_that_inherits_owner_and_client_type(
    pool: asyncpg.Pool,
) -> None:
    parent = await _parent(pool)
    child = await subagents.spawn(pool, parent, "research this", title="researcher")
    assert child.parent_chat_id == parent.chat_id
    assert child.root_chat_id == parent.chat_id
    assert child.owner_id == parent.owner.user_id
    assert child.status == "pending"
    assert child.title == "researcher"


async def test_children_cannot_spawn(pool: asyncpg.Pool) -> None:
    parent = await _parent(pool)
    child = await subagents.spawn(pool, parent, "child")
    as_child = Parent(chat_id=child.id, owner=parent.owner, is_child=True)
    with pytest.raises(SubagentError, match="cannot spawn"):
        await subagents.spawn(pool, as_child, "grandchild")


async def test_a_chat_reaches_only_its_own_children(pool: asyncpg.Pool, listener: Listener) -> None:
    first = await _parent(pool)
    second = Parent(
        chat_id=(await chats.create_chat(pool, first.owner, "other"))[0].id,
        owner=first.owner,
        is_child=False,
    )
    child = await subagents.spawn(pool, first, "mine")
    for operation in (
        subagents.wait(pool, listener, second, child.id, timeout_s=1),
        subagents.message(pool, second, child.id, "hi", queue_limit=20),
        subagents.close(pool, second, child.id),
    ):
        with pytest.raises(SubagentError, match="no sub-agent"):
            await operation


async def test_wait_returns_the_answer_when_the_child_finishes(
    pool: asyncpg.Pool, listener: Listener
) -> None:
    parent = await _parent(pool)
    child = await subagents.spawn(pool, parent, "compute")
    waiter = asyncio.create_task(subagents.wait(pool, listener, parent, child.id, timeout_s=30))
    await _finish(pool, child.id, "42")
    assert await waiter == {"chat_id": str(child.id), "status": "waiting", "answer": "42"}


async def test_wait_times_out_with_the_child_still_busy(
    pool: asyncpg.Pool, listener: Listener
) -> None:
    parent = await _parent(pool)
    child = await subagents.spawn(pool, parent, "slow")
    outcome = await subagents.wait(pool, listener, parent, child.id, timeout_s=0.2)
    assert outcome == {"chat_id": str(child.id), "status": "pending", "timed_out": True}


async def test_stop_and_archive_of_the_parent_reach_its_children(pool: asyncpg.Pool) -> None:
    parent = await _parent(pool)
    pending_child = await subagents.spawn(pool, parent, "a")
    running_child = await subagents.spawn(pool, parent, "b")
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE chats SET status = 'running', worker_id = $2 WHERE id = $1",
            running_child.id,
            uuid.uuid4(),
        )

    await chats.interrupt(pool, parent.owner, parent.chat_id)
    assert (await chats.get_chat(pool, parent.owner, pending_child.id)).status == "waiting"
    marked = await chats.get_chat(pool, parent.owner, running_child.id)
    assert marked.status == "running"
    assert marked.interrupt_requested

    await chats.update_chat(pool, parent.owner, parent.chat_id, archived=True)
    for child_id in (pending_child.id, running_child.id):
        archived = await chats.get_chat(pool, parent.owner, child_id)
        assert archived.archived
        assert archived.status == "waiting"
        assert archived.worker_id is None


async def test_message_and_close_drive_the_child(pool: asyncpg.Pool) -> None:
    parent = await _parent(pool)
    child = await subagents.spawn(pool, parent, "first")
    assert await subagents.message(pool, parent, child.id, "more", queue_limit=20) == {
        "chat_id": str(child.id),
        "queued": True,  # the child is still pending with its first message
    }
    assert await subagents.close(pool, parent, child.id) == {
        "chat_id": str(child.id),
        "status": "waiting",
        "archived": True,
    }
