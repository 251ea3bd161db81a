"""The REST routes of docs/api.md over real HTTP against a real database: shapes (checked
against the models the OpenAPI document is generated from), statuses, paging, the state machine
transitions they drive, and the admin-only model-config routes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.http.models import (
    ChatList,
    ChatOut,
    Health,
    MessageEnvelope,
    MessageList,
    MessageOut,
    ModelConfigList,
    ModelConfigOut,
    QueuedEnvelope,
    ReplicaList,
    SpendLimitBody,
)
from app.http.routing import Call
from tests import factories
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, SimulatedWorker, api_instance, call, new_chat


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url, queue_limit=3) as instance:
        yield instance


@pytest.fixture
async def alice(api: ApiInstance) -> ApiUser:
    return await factories.create_api_user(api.pool, name="alice")


@pytest.fixture
async def admin(api: ApiInstance) -> ApiUser:
    return await factories.create_api_user(api.pool, name="root", admin=True)


async def test_create_chat_answers_201_with_a_pending_chat(
    api: ApiInstance, alice: ApiUser
) -> None:
    status, body = await call(
        api, alice, "POST", "/api/v1/chats", {"content": "hello there", "title": "greeting"}
    )
    assert status == 201
    chat = ChatOut.model_validate(body)
    assert chat.status == "pending"
    assert chat.owner_id == alice.id
    assert chat.title == "greeting"
    assert chat.model_config_id == factories.ECHO_MODEL_CONFIG_ID

    status, body = await call(api, alice, "GET", f"/api/v1/chats/{chat.id}/messages")
    assert status == 200
    page = MessageList.model_validate(body)
    assert [m.content for m in page.messages] == [[{"type": "text", "text": "hello there"}]]
    assert page.queued == []
    assert page.next is None


async def test_content_may_be_text_parts(api: ApiInstance, alice: ApiUser) -> None:
    status, body = await call(
        api,
        alice,
        "POST",
        "/api/v1/chats",
        {"content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
    )
    assert status == 201
    _, page = await call(api, alice, "GET", f"/api/v1/chats/{body['id']}/messages")
    assert page["messages"][0]["content"] == [
        {"type": "text", "text": "one"},
        {"type": "text", "text": "two"},
    ]


async def test_list_chats_pages_newest_first_with_a_cursor(
    api: ApiInstance, alice: ApiUser
) -> None:
    created = [(await new_chat(api, alice, f"chat {i}"))["id"] for i in range(5)]
    other = await factories.create_api_user(api.pool, name="bob")
    await new_chat(api, other)  # never listed for alice

    seen: list[str] = []
    path = "/api/v1/chats?limit=2"
    while True:
        status, body = await call(api, alice, "GET", path)
        assert status == 200
        page = ChatList.model_validate(body)
        seen += [str(chat.id) for chat in page.chats]
        if page.next is None:
            break
        path = f"/api/v1/chats?limit=2&before={page.next}"
    assert seen == list(reversed(created))

    status, body = await call(api, alice, "GET", "/api/v1/chats?status=running")
    assert (status, body["chats"]) == (200, [])
    status, body = await call(api, alice, "GET", "/api/v1/chats?status=pending&archived=false")
    assert status == 200 and len(body["chats"]) == 5


async def test_get_and_patch_a_chat(api: ApiInstance, alice: ApiUser) -> None:
    chat = await new_chat(api, alice)
    status, body = await call(api, alice, "GET", f"/api/v1/chats/{chat['id']}")
    assert status == 200 and ChatOut.model_validate(body).id == uuid.UUID(chat["id"])

    status, body = await call(
        api, alice, "PATCH", f"/api/v1/chats/{chat['id']}", {"title": "renamed"}
    )
    assert status == 200 and body["title"] == "renamed" and body["version"] > chat["version"]

    # Archiving a busy chat stops it.
    status, body = await call(
        api, alice, "PATCH", f"/api/v1/chats/{chat['id']}", {"archived": True}
    )
    assert status == 200 and body["archived"] is True and body["status"] == "waiting"

    status, body = await call(
        api, alice, "POST", f"/api/v1/chats/{chat['id']}/messages", {"content": "more"}
    )
    assert status == 409 and "archived" in body["message"]


async def test_send_message_is_201_when_idle_202_when_busy_429_when_the_queue_is_full(
    api: ApiInstance, alice: ApiUser
) -> None:
    chat = await new_chat(api, alice)
    path = f"/api/v1/chats/{chat['id']}/messages"
    # Pending (busy): queued until the limit (3 in this fixture), then 429.
    for i in range(3):
        status, body = await call(api, alice, "POST", path, {"content": f"q{i}"})
        assert status == 202
        QueuedEnvelope.model_validate(body)
    status, body = await call(api, alice, "POST", path, {"content": "one too many"})
    assert status == 429
    assert body["message"].startswith("the chat's message queue is full")

    await SimulatedWorker(api.pool, uuid.UUID(chat["id"])).finish("waiting")
    async with api.pool.acquire() as conn:
        await conn.execute(
            "DELETE FROM chat_queued_messages WHERE chat_id = $1", uuid.UUID(chat["id"])
        )
    status, body = await call(api, alice, "POST", path, {"content": "now"})
    assert status == 201
    envelope = MessageEnvelope.model_validate(body)
    assert envelope.message.role == "user"
    status, body = await call(api, alice, "GET", f"/api/v1/chats/{chat['id']}")
    assert body["status"] == "pending"


async def test_list_messages_pages_by_after_id(api: ApiInstance, alice: ApiUser) -> None:
    chat = await new_chat(api, alice)
    async with api.pool.acquire() as conn:
        for i in range(4):
            await factories.create_message(
                conn, chat_id=uuid.UUID(chat["id"]), role="assistant", text=f"a{i}"
            )
    ids: list[int] = []
    after = 0
    while True:
        status, body = await call(
            api, alice, "GET", f"/api/v1/chats/{chat['id']}/messages?after_id={after}&limit=2"
        )
        assert status == 200
        page = MessageList.model_validate(body)
        ids += [m.id for m in page.messages]
        if page.next is None:
            break
        after = page.next
    assert len(ids) == 5 and ids == sorted(ids)


async def test_edit_a_user_message_and_refuse_editing_an_assistant_message(
    api: ApiInstance, alice: ApiUser
) -> None:
    chat = await new_chat(api, alice, "first")
    chat_id = uuid.UUID(chat["id"])
    async with api.pool.acquire() as conn:
        answer = await factories.create_message(conn, chat_id=chat_id, role="assistant")
    _, page = await call(api, alice, "GET", f"/api/v1/chats/{chat_id}/messages")
    first_id = page["messages"][0]["id"]

    status, body = await call(
        api, alice, "PATCH", f"/api/v1/chats/{chat_id}/messages/{answer['id']}", {"content": "x"}
    )
    assert status == 409 and "only user messages" in body["message"]

    status, body = await call(
        api, alice, "PATCH", f"/api/v1/chats/{chat_id}/messages/{first_id}", {"content": "new"}
    )
    assert status == 200
    assert MessageOut.model_validate(body).content == [{"type": "text", "text": "new"}]
    _, page = await call(api, alice, "GET", f"/api/v1/chats/{chat_id}/messages")
    assert [m["content"][0]["text"] for m in page["messages"]] == ["new"]

    status, body = await call(
        api, alice, "PATCH", f"/api/v1/chats/{chat_id}/messages/999999", {"content": "x"}
    )
    assert status == 404


async def test_interrupt_a_pending_chat(api: ApiInstance, alice: ApiUser) -> None:
    chat = await new_chat(api, alice)
    status, body = await call(api, alice, "POST", f"/api/v1/chats/{chat['id']}/interrupt")
    assert status == 200 and ChatOut.model_validate(body).status == "waiting"


async def test_delete_and_promote_queued_messages(api: ApiInstance, alice: ApiUser) -> None:
    chat = await new_chat(api, alice)
    chat_id = uuid.UUID(chat["id"])
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    path = f"/api/v1/chats/{chat_id}/messages"
    _, first = await call(api, alice, "POST", path, {"content": "q1"})
    _, second = await call(api, alice, "POST", path, {"content": "q2"})

    status, body = await call(
        api, alice, "DELETE", f"/api/v1/chats/{chat_id}/queue/{first['queued']['id']}"
    )
    assert (status, body) == (204, None)
    status, body = await call(
        api, alice, "DELETE", f"/api/v1/chats/{chat_id}/queue/{first['queued']['id']}"
    )
    assert status == 404

    # Running: the run is interrupted and the message goes first (202).
    promote = f"/api/v1/chats/{chat_id}/queue/{second['queued']['id']}/promote"
    status, body = await call(api, alice, "POST", promote)
    assert status == 202 and body["queued"]["promoted"] is True
    _, current = await call(api, alice, "GET", f"/api/v1/chats/{chat_id}")
    assert current["status"] == "running"

    # Idle: sent at once (200 Message).
    await worker.finish("waiting")
    status, body = await call(api, alice, "POST", promote)
    assert status == 200 and MessageOut.model_validate(body).role == "user"
    _, current = await call(api, alice, "GET", f"/api/v1/chats/{chat_id}")
    assert current["status"] == "pending"


async def test_spend_limit_answers_409_with_its_body(api: ApiInstance, alice: ApiUser) -> None:
    async with api.pool.acquire() as conn:
        await factories.create_spend_limit(conn, limit_micros=100)
        chat = await factories.create_chat(conn, owner_id=alice.id)
        await factories.record_spend(conn, chat_id=chat["id"], cost_micros=100)
    status, body = await call(api, alice, "POST", "/api/v1/chats", {"content": "hello"})
    assert status == 409
    limit = SpendLimitBody.model_validate(body)
    assert (limit.spent_micros, limit.limit_micros) == (100, 100)


async def test_model_configs_admin_writes(api: ApiInstance, alice: ApiUser, admin: ApiUser) -> None:
    new = {
        "provider": "builtin",
        "model": "echo",
        "display_name": "Slow echo",
        "options": {"token_delay_ms": 5, "input_micros_per_mtok": 3},
    }
    status, body = await call(api, alice, "POST", "/api/v1/model-configs", new)
    assert status == 403

    status, body = await call(api, admin, "POST", "/api/v1/model-configs", new)
    assert status == 201
    created = ModelConfigOut.model_validate(body)
    assert created.options == {"token_delay_ms": 5, "input_micros_per_mtok": 3}
    assert not created.is_default

    path = f"/api/v1/model-configs/{created.id}"
    status, body = await call(api, alice, "PATCH", path, {"display_name": "x"})
    assert status == 403
    status, body = await call(api, admin, "PATCH", path, {"is_default": True})
    assert status == 200 and body["is_default"] is True
    _, listing = await call(api, alice, "GET", "/api/v1/model-configs")
    configs = ModelConfigList.model_validate(listing).model_configs
    assert [c.id for c in configs if c.is_default] == [created.id]

    # The default cannot be disabled or deleted; the old default can be, once unused.
    status, body = await call(api, admin, "PATCH", path, {"enabled": False})
    assert status == 409
    status, body = await call(api, admin, "DELETE", path)
    assert status == 409
    echo = f"/api/v1/model-configs/{factories.ECHO_MODEL_CONFIG_ID}"
    status, body = await call(api, admin, "PATCH", echo, {"enabled": False})
    assert status == 200 and body["enabled"] is False
    _, listing = await call(api, alice, "GET", "/api/v1/model-configs")
    assert factories.ECHO_MODEL_CONFIG_ID not in [
        c.id for c in ModelConfigList.model_validate(listing).model_configs
    ]
    _, listing = await call(api, admin, "GET", "/api/v1/model-configs")
    assert len(listing["model_configs"]) == 3  # echo, script (both seeded) and the new one

    # In use by a chat: 409 with the way out; unused: 204.
    await new_chat(api, alice)  # uses the new default
    status, body = await call(api, admin, "PATCH", echo, {"is_default": True, "enabled": True})
    assert status == 200
    status, body = await call(api, admin, "DELETE", path)
    assert status == 409 and "disable it" in body["detail"]
    status, body = await call(
        api, admin, "POST", "/api/v1/model-configs", {"provider": "openai", "model": "gpt-x"}
    )
    status, body = await call(api, admin, "DELETE", f"/api/v1/model-configs/{body['id']}")
    assert status == 204
    status, body = await call(api, admin, "DELETE", f"/api/v1/model-configs/{uuid.uuid4()}")
    assert status == 404


async def test_model_config_options_are_checked(api: ApiInstance, admin: ApiUser) -> None:
    for options in (
        {"input_micros_per_mtok": -1},
        {"output_micros_per_mtok": "lots"},
        {"token_delay_ms": "slow"},
        {"token_delay_ms": 10**9},
    ):
        status, body = await call(
            api,
            admin,
            "POST",
            "/api/v1/model-configs",
            {"provider": "builtin", "model": "echo", "options": options},
        )
        assert status == 400, (options, body)


async def test_replicas_lists_heartbeat_ages_to_admins_only(
    api: ApiInstance, alice: ApiUser, admin: ApiUser
) -> None:
    replica_id = await factories.create_replica_row(
        api.pool, hostname="host-a", pid=42, address="10.0.0.7:8080", heartbeat_age_s=3
    )
    status, body = await call(api, alice, "GET", "/api/v1/replicas")
    assert status == 403
    assert "host-a" not in str(body) and "10.0.0.7" not in str(body)

    status, body = await call(api, admin, "GET", "/api/v1/replicas")
    assert status == 200
    replicas = ReplicaList.model_validate(body).replicas
    mine = [r for r in replicas if r.id == replica_id]
    assert len(mine) == 1 and mine[0].heartbeat_age_s >= 3 and mine[0].hostname == "host-a"


async def test_the_openapi_document_is_served(api: ApiInstance, alice: ApiUser) -> None:
    status, body = await call(api, alice, "GET", "/api/v1/openapi.json")
    assert status == 200 and body["openapi"].startswith("3.1")


async def test_model_config_credentials_are_never_shown_and_survive_a_round_trip(
    api: ApiInstance, alice: ApiUser, admin: ApiUser
) -> None:
    status, created = await call(
        api,
        admin,
        "POST",
        "/api/v1/model-configs",
        {"provider": "openai", "model": "gpt-x", "options": {"api_key": "sk-secret", "x": 1}},
    )
    assert status == 201
    assert created["options"] == {"api_key": "[redacted]", "x": 1}
    status, listed = await call(api, alice, "GET", "/api/v1/model-configs")
    assert status == 200
    assert "sk-secret" not in str(listed)

    # Sending back what was read keeps the stored key; a new key replaces it.
    config_path = f"/api/v1/model-configs/{created['id']}"
    status, _ = await call(api, admin, "PATCH", config_path, {"options": created["options"]})
    assert status == 200
    stored = await api.pool.fetchval(
        "SELECT options ->> 'api_key' FROM chat_model_configs WHERE id = $1",
        uuid.UUID(created["id"]),
    )
    assert stored == "sk-secret"
    status, _ = await call(api, admin, "PATCH", config_path, {"options": {"api_key": "sk-new"}})
    assert status == 200
    stored = await api.pool.fetchval(
        "SELECT options ->> 'api_key' FROM chat_model_configs WHERE id = $1",
        uuid.UUID(created["id"]),
    )
    assert stored == "sk-new"


async def test_readyz_says_unavailable_without_the_error_text(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Public route: the database error (addresses, user names, driver state) goes to the log,
    not to whoever asks."""
    async with api_instance(database_url) as instance:
        async with instance.client.get("/readyz") as response:
            assert response.status == 200
        unreachable = await asyncpg.create_pool(
            "postgresql://chatd_secret_user@127.0.0.1:1/db", min_size=0, max_size=1
        )
        assert unreachable is not None
        try:
            # The database goes away (for the handlers' pool).
            monkeypatch.setattr(Call, "pool", property(lambda _call: unreachable))
            async with instance.client.get("/readyz") as response:
                assert response.status == 503
                body = await response.json()
        finally:
            monkeypatch.undo()
            await unreachable.close()
    assert body == {"status": "unavailable", "message": "database unreachable"}
    Health.model_validate(body)
