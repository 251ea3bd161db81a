"""Spend limits: reached -> the turn is refused with the structured body; under -> accepted;
a limit in one organization never bleeds into another."""

from __future__ import annotations

import asyncpg
import pytest

from app.db.queries import Conn
from app.errors import SpendLimitReached
from app.state import chats
from app.state.model import Owner
from tests import factories


async def _owner(conn: Conn, organization_id: object = None) -> Owner:
    if organization_id is None:
        organization_id = factories.DEFAULT_ORGANIZATION_ID
    user = await factories.create_user(conn, organization_id=organization_id)
    return Owner(user_id=user["id"], organization_id=user["organization_id"])


async def test_under_the_limit_a_new_chat_is_accepted(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        owner = await _owner(conn)
        await factories.create_spend_limit(conn, limit_micros=1000)
        chat = await factories.create_chat(conn, owner_id=owner.user_id)
        await factories.record_spend(conn, chat_id=chat["id"], cost_micros=999)

    created, _ = await chats.create_chat(pool, owner, "hello")
    assert created.status == "pending"


async def test_reaching_the_limit_refuses_new_turns_and_writes_nothing(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        owner = await _owner(conn)
        await factories.create_spend_limit(conn, limit_micros=1000, period="day")
        chat = await factories.create_chat(conn, owner_id=owner.user_id)
        await factories.record_spend(conn, chat_id=chat["id"], cost_micros=600)
        await factories.record_spend(conn, chat_id=chat["id"], cost_micros=400)
        before = await conn.fetchval("SELECT count(*) FROM chat_messages")

    with pytest.raises(SpendLimitReached) as refused:
        await chats.create_chat(pool, owner, "hello")
    assert refused.value.body()["spent_micros"] == 1000
    assert refused.value.body()["limit_micros"] == 1000
    assert refused.value.body()["message"] == "spend limit reached"
    assert "T00:00:00" in refused.value.resets_at  # the next UTC midnight

    with pytest.raises(SpendLimitReached):
        await chats.send_message(pool, owner, chat["id"], "again", queue_limit=20)

    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM chat_messages") == before
        assert await conn.fetchval("SELECT count(*) FROM chats") == 1


async def test_a_user_override_beats_the_organization_default(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        owner = await _owner(conn)
        await factories.create_spend_limit(conn, limit_micros=10)
        await factories.create_spend_limit(conn, user_id=owner.user_id, limit_micros=10_000)
        chat = await factories.create_chat(conn, owner_id=owner.user_id)
        await factories.record_spend(conn, chat_id=chat["id"], cost_micros=500)

    created, _ = await chats.create_chat(pool, owner, "allowed by my own limit")
    assert created.status == "pending"


async def test_a_limit_in_one_organization_never_bleeds_into_another(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        other_org = await factories.create_organization(conn)
        limited = await _owner(conn)
        unlimited = await _owner(conn, other_org["id"])
        await factories.create_spend_limit(conn, limit_micros=100)
        for owner in (limited, unlimited):
            chat = await factories.create_chat(
                conn, owner_id=owner.user_id, organization_id=owner.organization_id
            )
            await factories.record_spend(conn, chat_id=chat["id"], cost_micros=5000)

    with pytest.raises(SpendLimitReached):
        await chats.create_chat(pool, limited, "no")
    created, _ = await chats.create_chat(pool, unlimited, "yes")
    assert created.organization_id == other_org["id"]
