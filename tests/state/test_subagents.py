"""Sub-agents at the data level: spawning, reaching only one's own children, waiting on a
child's notifications, Stop/archive of a parent reaching its children, the bound on open
children, and the fence: a run that lost its chat writes nothing for it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from app.db.listener import Listener
from app.errors import FencedOut
from app.state import chats, subagents
from app.state.model import Chat, Owner
from app.state.runs import RunToken
from app.state.subagents import Parent, SubagentError
from tests import engine_harness, factories

MAX_CHILDREN = 8


@pytest.fixture
async def listener(database_url: str) -> AsyncIterator[Listener]:
    async with engine_harness.running_listener(database_url) as running:
        yield running


async def _acquire(pool: asyncpg.Pool, chat_id: uuid.UUID) -> RunToken:
    """What a replica's acquire does to the row (running, a worker, a new generation): the
    sub-agent tools act for that run."""
    worker_id = uuid.uuid4()
    generation = await pool.fetchval(
        "UPDATE chats SET status = 'running', worker_id = $2, generation = generation + 1"
        " WHERE id = $1 RETURNING generation",
        chat_id,
        worker_id,
    )
    return RunToken(chat_id, worker_id, generation)


async def _parent(pool: asyncpg.Pool, owner: Owner | None = None) -> Parent:
    if owner is None:
        async with pool.acquire() as conn:
            user = await factories.create_user(conn)
        owner = Owner(user_id=user["id"], organization_id=user["organization_id"])
    chat, _ = await chats.create_chat(pool, owner, "parent task")
    run = await _acquire(pool, chat.id)
    return Parent(chat_id=chat.id, owner=owner, is_child=False, run=run)


async def spawn(pool: asyncpg.Pool, parent: Parent, prompt: str, title: str | None = None) -> Chat:
    return await subagents.spawn(pool, parent, prompt, title, max_children=MAX_CHILDREN)


async def _finish(pool: asyncpg.Pool, chat_id: uuid.UUID, answer: str) -> None:
    """What a worker's finished turn leaves behind: an assistant message, status waiting."""
    async with pool.acquire() as conn, conn.transaction():
        await factories.create_message(conn, chat_id=chat_id, role="assistant", text=answer)
        await conn.execute("UPDATE chats SET status = 'waiting' WHERE id = $1", chat_id)


async def test_spawn_creates_a_pending_child_that_inherits_owner_and_client_type(
    pool: asyncpg.Pool,
) -> None:
    parent = await _parent(pool)
    child = await spawn(pool, parent, "research this", title="researcher")
    assert child.parent_chat_id == parent.chat_id
    assert child.root_chat_id == parent.chat_id
    assert child.owner_id == parent.owner.user_id
    assert child.status == "pending"
    assert child.title == "researcher"


async def test_children_cannot_spawn(pool: asyncpg.Pool) -> None:
    parent = await _parent(pool)
    child = await spawn(pool, parent, "child")
    as_child = Parent(
        chat_id=child.id, owner=parent.owner, is_child=True, run=await _acquire(pool, child.id)
    )
    with pytest.raises(SubagentError, match="cannot spawn"):
        await spawn(pool, as_child, "grandchild")


async def test_a_chat_reaches_only_its_own_children(pool: asyncpg.Pool, listener: Listener) -> None:
    first = await _parent(pool)
    second = await _parent(pool, first.owner)
    child = await spawn(pool, first, "mine")
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
    child = await spawn(pool, parent, "compute")
    waiter = asyncio.create_task(subagents.wait(pool, listener, parent, child.id, timeout_s=30))
    await _finish(pool, child.id, "42")
    assert await waiter == {"chat_id": str(child.id), "status": "waiting", "answer": "42"}


async def test_wait_times_out_with_the_child_still_busy(
    pool: asyncpg.Pool, listener: Listener
) -> None:
    parent = await _parent(pool)
    child = await spawn(pool, parent, "slow")
    outcome = await subagents.wait(pool, listener, parent, child.id, timeout_s=0.2)
    assert outcome == {"chat_id": str(child.id), "status": "pending", "timed_out": True}


async def test_stop_and_archive_of_the_parent_reach_its_children(pool: asyncpg.Pool) -> None:
    parent = await _parent(pool)
    pending_child = await spawn(pool, parent, "a")
    running_child = await spawn(pool, parent, "b")
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
    child = await spawn(pool, parent, "first")
    assert await subagents.message(pool, parent, child.id, "more", queue_limit=20) == {
        "chat_id": str(child.id),
        "queued": True,  # the child is still pending with its first message
    }
    assert await subagents.close(pool, parent, child.id) == {
        "chat_id": str(child.id),
        "status": "waiting",
        "archived": True,
    }


# --- the fence: a run that lost its chat writes nothing for it -----------------------------


async def _child_state(pool: asyncpg.Pool, parent_id: uuid.UUID) -> list[tuple[object, ...]]:
    """Every child of the parent with what sub-agent writes change: archived, status, and the
    number of its messages and queued messages."""
    rows = await pool.fetch(
        """
        SELECT c.id, c.archived, c.status,
               (SELECT count(*) FROM chat_messages m WHERE m.chat_id = c.id) AS messages,
               (SELECT count(*) FROM chat_queued_messages q WHERE q.chat_id = c.id) AS queued
        FROM chats c WHERE c.parent_chat_id = $1 ORDER BY c.id
        """,
        parent_id,
    )
    return [tuple(row.values()) for row in rows]


async def _reacquire(pool: asyncpg.Pool, parent: Parent) -> None:
    """Another run took the chat (a requeue then a new acquire): the generation moved on."""
    await _acquire(pool, parent.chat_id)


async def _archive(pool: asyncpg.Pool, parent: Parent) -> None:
    """The user archived the chat mid-run: it stops (worker_id cleared), its children too."""
    await chats.update_chat(pool, parent.owner, parent.chat_id, archived=True)


@pytest.mark.parametrize("lose_chat", [_reacquire, _archive], ids=["reacquired", "archived"])
async def test_a_run_that_lost_its_chat_cannot_spawn_message_or_close(
    pool: asyncpg.Pool, lose_chat: Callable[[asyncpg.Pool, Parent], Awaitable[None]]
) -> None:
    parent = await _parent(pool)
    child = await spawn(pool, parent, "working for the old run")
    await lose_chat(pool, parent)
    before = await _child_state(pool, parent.chat_id)

    with pytest.raises(FencedOut):
        await spawn(pool, parent, "spawned by a run that lost its chat")
    with pytest.raises(FencedOut):
        await subagents.message(pool, parent, child.id, "from a stale run", queue_limit=20)
    with pytest.raises(FencedOut):
        await subagents.close(pool, parent, child.id)

    assert await _child_state(pool, parent.chat_id) == before


async def test_open_children_are_bounded_and_closing_one_makes_room(pool: asyncpg.Pool) -> None:
    parent = await _parent(pool)
    first = await subagents.spawn(pool, parent, "one", max_children=2)
    await subagents.spawn(pool, parent, "two", max_children=2)

    with pytest.raises(SubagentError, match=r"max_children_per_chat = 2"):
        await subagents.spawn(pool, parent, "three", max_children=2)
    assert len(await _child_state(pool, parent.chat_id)) == 2  # nothing written

    await subagents.close(pool, parent, first.id)
    third = await subagents.spawn(pool, parent, "three", max_children=2)
    assert third.parent_chat_id == parent.chat_id
