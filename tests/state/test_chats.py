"""The user's side of the state machine (app/state/chats.py): what it refuses, it refuses with a
typed error and changes nothing."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from app.errors import Conflict, InvalidTransition, NotFound, QueueFull, ValidationFailed
from app.state import chats
from tests import engine_harness, factories


async def test_a_full_queue_refuses_another_message(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    chat, _ = await chats.create_chat(pool, owner, "busy")  # pending: new messages queue
    for i in range(3):
        sent = await chats.send_message(pool, owner, chat.id, f"q{i}", queue_limit=3)
        assert sent.queued is not None
    before = await engine_harness.state_snapshot(pool)
    with pytest.raises(QueueFull) as raised:
        await chats.send_message(pool, owner, chat.id, "one too many", queue_limit=3)
    assert raised.value.limit == 3
    assert await engine_harness.state_snapshot(pool) == before


async def test_only_user_messages_can_be_edited(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    chat, _ = await chats.create_chat(pool, owner, "question")
    assistant_id = (
        await factories.create_message(pool, chat_id=chat.id, role="assistant", text="answer")
    )["id"]
    before = await engine_harness.state_snapshot(pool)
    with pytest.raises(InvalidTransition) as raised:
        await chats.edit_message(pool, owner, chat.id, assistant_id, "rewritten")
    assert raised.value.transition == "edit a message of"
    assert "only user messages" in raised.value.reason
    with pytest.raises(NotFound):
        await chats.edit_message(pool, owner, chat.id, assistant_id + 1000, "rewritten")
    assert await engine_harness.state_snapshot(pool) == before


async def test_another_users_chat_is_indistinguishable_from_a_missing_one(
    pool: asyncpg.Pool,
) -> None:
    owner = await factories.create_owner(pool)
    stranger = await factories.create_owner(pool)
    chat, message = await chats.create_chat(pool, owner, "mine")
    queued = await chats.send_message(pool, owner, chat.id, "queued", queue_limit=20)
    assert queued.queued is not None
    missing = uuid.uuid4()
    before = await engine_harness.state_snapshot(pool)

    for who, chat_id in ((stranger, chat.id), (owner, missing)):
        operations = [
            chats.get_chat(pool, who, chat_id),
            chats.send_message(pool, who, chat_id, "hi", queue_limit=20),
            chats.interrupt(pool, who, chat_id),
            chats.edit_message(pool, who, chat_id, message.id, "changed"),
            chats.delete_queued(pool, who, chat_id, queued.queued.id),
            chats.promote_queued(pool, who, chat_id, queued.queued.id),
            chats.update_chat(pool, who, chat_id, title="stolen", archived=True),
            chats.list_messages(pool, who, chat_id),
        ]
        for operation in operations:
            with pytest.raises(NotFound):
                await operation
    assert await engine_harness.state_snapshot(pool) == before
    assert await chats.list_chats(pool, stranger) == []


async def test_archived_chats_refuse_messages_and_edits(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    chat, message = await chats.create_chat(pool, owner, "old")
    archived = await chats.update_chat(pool, owner, chat.id, archived=True)
    assert (archived.status, archived.archived) == ("waiting", True)
    before = await engine_harness.state_snapshot(pool)
    with pytest.raises(InvalidTransition):
        await chats.send_message(pool, owner, chat.id, "hello?", queue_limit=20)
    with pytest.raises(InvalidTransition):
        await chats.edit_message(pool, owner, chat.id, message.id, "hello?")
    assert await engine_harness.state_snapshot(pool) == before


async def test_malformed_content_never_reaches_the_database(pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    chat, _ = await chats.create_chat(pool, owner, "fine")
    before = await engine_harness.state_snapshot(pool)
    for content in ("", "   ", [], [{"type": "image"}], 42, [{"type": "text", "text": 1}]):
        with pytest.raises(ValidationFailed):
            await chats.send_message(pool, owner, chat.id, content, queue_limit=20)
    assert await engine_harness.state_snapshot(pool) == before


async def test_interrupting_a_pending_chat_is_final(database_url: str, pool: asyncpg.Pool) -> None:
    """Stop on a pending chat: waiting at once, and no replica ever picks it up."""
    owner = await factories.create_owner(pool)
    chat, _ = await chats.create_chat(pool, owner, "never mind")
    stopped = await chats.interrupt(pool, owner, chat.id)
    assert (stopped.status, stopped.interrupt_requested) == ("waiting", False)
    async with engine_harness.running_replica(
        database_url, pool, acquire_poll_interval_s=0.1
    ) as replica:
        # A later chat is answered, so the replica has been acquiring (and polling) meanwhile.
        later, _ = await chats.create_chat(pool, owner, "and this?")
        await engine_harness.wait_status(pool, later.id, "waiting")
        target = replica.stats.acquire_attempts + 2

        async def polled_twice_more() -> bool:
            return replica.stats.acquire_attempts >= target

        await engine_harness.eventually(polled_twice_more, message="two more acquire attempts")
    row = await engine_harness.chat_row(pool, chat.id)
    assert (row.status, row.generation) == ("waiting", 0)
    assert [role for role, _ in await engine_harness.history(pool, chat.id)] == ["user"]


async def test_a_chat_id_chosen_by_the_client_is_taken_once(pool: asyncpg.Pool) -> None:
    """The AI SDK names its chats: the first request creates the chat under that id, later
    ones send to it; another user's id is a missing chat, and nothing of theirs changes."""
    alice = await factories.create_owner(pool)
    bob = await factories.create_owner(pool)
    chat_id = uuid.uuid4()
    created = await chats.send_or_create(pool, alice, chat_id, "first", queue_limit=3)
    assert created.chat.id == chat_id and created.chat.owner_id == alice.user_id
    assert created.message is not None
    again = await chats.send_or_create(pool, alice, chat_id, "second", queue_limit=3)
    assert again.queued is not None  # the chat is pending: queued, as a send is

    before = await engine_harness.state_snapshot(pool)
    with pytest.raises(Conflict):
        await chats.create_chat(pool, bob, "mine now", chat_id=chat_id)
    with pytest.raises(NotFound):
        await chats.send_or_create(pool, bob, chat_id, "mine now", queue_limit=3)
    assert await engine_harness.state_snapshot(pool) == before


async def test_regenerate_edits_the_last_user_message_with_its_own_content(
    pool: asyncpg.Pool,
) -> None:
    owner = await factories.create_owner(pool)
    chat, first = await chats.create_chat(pool, owner, [{"type": "text", "text": "again"}])
    async with pool.acquire() as conn:
        await factories.create_message(conn, chat_id=chat.id, role="assistant", text="once")
    await pool.execute("UPDATE chats SET status = 'waiting' WHERE id = $1", chat.id)

    rerun = await chats.regenerate(pool, owner, chat.id)
    assert rerun.id > first.id and rerun.content == first.content
    assert (await chats.last_user_message(pool, owner, chat.id)) == rerun
    visible = await chats.list_messages(pool, owner, chat.id)
    assert [m.id for m in visible[0]] == [rerun.id]
    assert (await chats.get_chat(pool, owner, chat.id)).status == "pending"
    other = await factories.create_owner(pool)
    with pytest.raises(NotFound):
        await chats.regenerate(pool, other, chat.id)
    assert await chats.last_user_message(pool, other, chat.id) is None
