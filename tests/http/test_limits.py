"""Per-user limits over real HTTP (max_chats_per_user, max_pending_chats_per_user): reaching one
answers 429 with a body naming the limit and changes nothing, on every transition that adds a
chat or makes one pending; and the queue order after a Stop (docs/api.md, "Queue after Stop")."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.http.models import LimitBody, MessageEnvelope, QueuedEnvelope
from tests import factories
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, SimulatedWorker, api_instance, call, new_chat


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(
        database_url, max_chats_per_user=4, max_pending_chats_per_user=2, queue_limit=5
    ) as instance:
        yield instance


@pytest.fixture
async def alice(api: ApiInstance) -> ApiUser:
    return await factories.create_api_user(api.pool, name="alice")


async def _waiting_chat(api: ApiInstance, user: ApiUser, text: str = "hello") -> dict[str, Any]:
    chat = await new_chat(api, user, text)
    status, chat = await call(api, user, "POST", f"/api/v1/chats/{chat['id']}/interrupt")
    assert status == 200 and chat["status"] == "waiting"
    return dict(chat)


def _limit(body: Any, name: str, maximum: int) -> None:
    limit = LimitBody.model_validate(body)
    assert (limit.limit, limit.maximum) == (name, maximum)
    assert name in (limit.detail or "")


async def _snapshot(api: ApiInstance, user: ApiUser) -> list[tuple[Any, ...]]:
    """Everything a refused request could have changed, for this user."""
    rows = await api.pool.fetch(
        """
        SELECT c.id, c.status, c.archived, c.version,
               (SELECT array_agg(m.id ORDER BY m.id) FROM chat_messages m
                WHERE m.chat_id = c.id AND NOT m.deleted) AS messages,
               (SELECT array_agg(q.id ORDER BY q.id) FROM chat_queued_messages q
                WHERE q.chat_id = c.id) AS queued
        FROM chats c WHERE c.owner_id = $1 ORDER BY c.id
        """,
        user.id,
    )
    return [tuple(row.values()) for row in rows]


async def test_create_beyond_the_pending_limit_is_429_and_creates_nothing(
    api: ApiInstance, alice: ApiUser
) -> None:
    await new_chat(api, alice)
    await new_chat(api, alice)
    before = await _snapshot(api, alice)
    status, body = await call(api, alice, "POST", "/api/v1/chats", {"content": "third"})
    assert status == 429
    _limit(body, "pending_chats_per_user", 2)
    assert await _snapshot(api, alice) == before
    # The limit is per user: someone else is not affected.
    bob = await factories.create_api_user(api.pool, name="bob")
    await new_chat(api, bob)


async def test_create_and_unarchive_beyond_the_chat_limit_are_429(
    api: ApiInstance, alice: ApiUser
) -> None:
    chats = [await _waiting_chat(api, alice) for _ in range(4)]
    status, body = await call(api, alice, "POST", "/api/v1/chats", {"content": "fifth"})
    assert status == 429
    _limit(body, "chats_per_user", 4)

    # Archived chats do not count...
    path = f"/api/v1/chats/{chats[0]['id']}"
    status, _ = await call(api, alice, "PATCH", path, {"archived": True})
    assert status == 200
    await _waiting_chat(api, alice)
    # ...so unarchiving counts as adding one (or archive/create/unarchive would get around it).
    before = await _snapshot(api, alice)
    status, body = await call(api, alice, "PATCH", path, {"archived": False, "title": "t"})
    assert status == 429
    _limit(body, "chats_per_user", 4)
    assert await _snapshot(api, alice) == before
    # Retitling an archived chat is not adding one.
    status, _ = await call(api, alice, "PATCH", path, {"title": "still archived"})
    assert status == 200


async def test_every_transition_to_pending_respects_the_pending_limit(
    api: ApiInstance, alice: ApiUser
) -> None:
    idle = await _waiting_chat(api, alice)
    idle_id = uuid.UUID(idle["id"])
    async with api.pool.acquire() as conn:
        queued = await factories.create_queued_message(conn, chat_id=idle_id)
    busy = [await new_chat(api, alice) for _ in range(2)]  # the two pending chats allowed
    _, page = await call(api, alice, "GET", f"/api/v1/chats/{idle_id}/messages")
    first = page["messages"][0]["id"]
    before = await _snapshot(api, alice)

    refused = [
        ("POST", f"/api/v1/chats/{idle_id}/messages", {"content": "send"}),
        ("PATCH", f"/api/v1/chats/{idle_id}/messages/{first}", {"content": "edit"}),
        ("POST", f"/api/v1/chats/{idle_id}/queue/{queued['id']}/promote", None),
    ]
    for method, path, body in refused:
        status, answer = await call(api, alice, method, path, body)
        assert status == 429, (path, answer)
        _limit(answer, "pending_chats_per_user", 2)
        assert await _snapshot(api, alice) == before, path

    # Sending to a chat that is already pending only queues: no new pending chat.
    status, _ = await call(
        api, alice, "POST", f"/api/v1/chats/{busy[0]['id']}/messages", {"content": "q"}
    )
    assert status == 202
    # One pending chat fewer (stopped): the idle chat may go.
    await call(api, alice, "POST", f"/api/v1/chats/{busy[1]['id']}/interrupt")
    status, _ = await call(
        api, alice, "PATCH", f"/api/v1/chats/{idle_id}/messages/{first}", {"content": "edit"}
    )
    assert status == 200


async def test_concurrent_creates_cannot_pass_the_limit_together(
    api: ApiInstance, alice: ApiUser
) -> None:
    results = await asyncio.gather(
        *(call(api, alice, "POST", "/api/v1/chats", {"content": f"c{i}"}) for i in range(8))
    )
    statuses = sorted(status for status, _ in results)
    assert statuses == [201, 201] + [429] * 6
    pending = await api.pool.fetchval(
        "SELECT count(*) FROM chats WHERE owner_id = $1 AND status = 'pending'", alice.id
    )
    assert pending == 2


# --------------------------------------------------------------------------------------------
# Queue after Stop.


async def test_a_message_sent_after_stop_queues_behind_the_earlier_ones(
    api: ApiInstance, alice: ApiUser
) -> None:
    chat = await new_chat(api, alice, "question")
    chat_id = uuid.UUID(chat["id"])
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    path = f"/api/v1/chats/{chat_id}/messages"
    for text in ("q1", "q2"):
        status, _ = await call(api, alice, "POST", path, {"content": text})
        assert status == 202
    # Stop: the run ends, the queue is left as it was (only a promoted message continues).
    await call(api, alice, "POST", f"/api/v1/chats/{chat_id}/interrupt")
    await worker.persist("partial answer")
    await worker.finish("waiting")

    status, body = await call(api, alice, "POST", path, {"content": "q3"})

    # q3 goes to the tail; q1, queued first, is sent first; the chat goes pending.
    assert status == 202
    assert QueuedEnvelope.model_validate(body).queued.content == [{"type": "text", "text": "q3"}]
    _, page = await call(api, alice, "GET", path)
    users = [m["content"][0]["text"] for m in page["messages"] if m["role"] == "user"]
    assert users == ["question", "q1"]
    assert [q["content"][0]["text"] for q in page["queued"]] == ["q2", "q3"]
    _, current = await call(api, alice, "GET", f"/api/v1/chats/{chat_id}")
    assert current["status"] == "pending"


async def test_a_message_sent_to_an_idle_chat_with_an_empty_queue_is_sent_at_once(
    api: ApiInstance, alice: ApiUser
) -> None:
    chat = await _waiting_chat(api, alice)
    status, body = await call(
        api, alice, "POST", f"/api/v1/chats/{chat['id']}/messages", {"content": "now"}
    )
    assert status == 201
    assert MessageEnvelope.model_validate(body).message.content[0]["text"] == "now"
