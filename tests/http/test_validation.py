"""Malformed input never reaches the database and never gives a 500: malformed JSON, wrong
types, unknown fields, oversized bodies, bad ids, strings Postgres cannot store. Every answer is
a 4xx JSON error `{message, detail?, validations?}` and no table changes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.http.models import ErrorBody
from tests import factories
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, api_instance

TABLES = ("chats", "chat_messages", "chat_queued_messages", "chat_model_configs", "users")


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url, max_body_bytes=4096) as instance:
        yield instance


@pytest.fixture
async def admin(api: ApiInstance) -> ApiUser:
    return await factories.create_api_user(api.pool, name="root", admin=True)


async def _counts(api: ApiInstance) -> dict[str, int]:
    return {t: int(await api.pool.fetchval(f"SELECT count(*) FROM {t}")) for t in TABLES}


async def _raw(
    api: ApiInstance, user: ApiUser, method: str, path: str, data: bytes | None = None
) -> tuple[int, Any]:
    headers = user.headers | {"Content-Type": "application/json"}
    async with api.client.request(method, path, data=data, headers=headers) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


async def _chat(api: ApiInstance, user: ApiUser) -> str:
    status, body = await _raw(api, user, "POST", "/api/v1/chats", _json({"content": "hi"}))
    assert status == 201
    return str(body["id"])


BAD_CHAT_BODIES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not json", b"{content: hi}"),
    ("truncated", b'{"content": "hi"'),
    ("not utf-8", b'{"content": "\xff\xfe"}'),
    ("NaN", b'{"content": "hi", "title": NaN}'),
    ("huge float", b'{"content": "hi", "title": 1e999}'),
    ("array", _json(["hi"])),
    ("null", b"null"),
    ("missing content", _json({"title": "x"})),
    ("content number", _json({"content": 5})),
    ("content object", _json({"content": {"text": "hi"}})),
    ("content empty", _json({"content": ""})),
    ("content blank", _json({"content": "   "})),
    ("content no parts", _json({"content": []})),
    ("part without type", _json({"content": [{"text": "hi"}]})),
    ("part of other type", _json({"content": [{"type": "image", "url": "x"}]})),
    ("part extra field", _json({"content": [{"type": "text", "text": "hi", "x": 1}]})),
    ("unknown field", _json({"content": "hi", "admin": True})),
    ("title too long", _json({"content": "hi", "title": "t" * 201})),
    ("title not a string", _json({"content": "hi", "title": 7})),
    ("bad client type", _json({"content": "hi", "client_type": "web"})),
    ("bad model config id", _json({"content": "hi", "model_config_id": "not-a-uuid"})),
    ("unknown model config", _json({"content": "hi", "model_config_id": str(uuid.uuid4())})),
    ("NUL in text", _json({"content": "a\u0000b"})),
    ("NUL in title", _json({"content": "hi", "title": "a\u0000"})),
    ("lone surrogate", b'{"content": "\\ud800"}'),
    ("deeper than python parses", b'{"content": ' + b"[" * 1500 + b"]" * 1500 + b"}"),
    ("deeper than allowed", b'{"content": ' + b"[" * 40 + b"]" * 40 + b"}"),
    ("too large", _json({"content": "x" * 5000})),
]


@pytest.mark.parametrize(("case", "body"), BAD_CHAT_BODIES, ids=[c for c, _ in BAD_CHAT_BODIES])
async def test_bad_bodies_answer_4xx_json_and_write_nothing(
    api: ApiInstance, admin: ApiUser, case: str, body: bytes
) -> None:
    before = await _counts(api)
    status, error = await _raw(api, admin, "POST", "/api/v1/chats", body)
    assert 400 <= status < 500, (case, status, error)
    ErrorBody.model_validate(error)
    assert status == (413 if case == "too large" else 400), (case, error)
    assert await _counts(api) == before


async def test_validation_errors_name_each_field(api: ApiInstance, admin: ApiUser) -> None:
    status, error = await _raw(
        api, admin, "POST", "/api/v1/chats", _json({"content": 1, "title": 2, "color": "red"})
    )
    assert status == 400
    fields = {v["field"] for v in error["validations"]}
    assert {"title", "color"} <= fields
    assert any(f.startswith("content") for f in fields)


async def test_bad_ids_in_paths_answer_400(api: ApiInstance, admin: ApiUser) -> None:
    chat_id = await _chat(api, admin)
    before = await _counts(api)
    for method, path in [
        ("GET", "/api/v1/chats/not-a-uuid"),
        ("GET", "/api/v1/chats/123"),
        ("GET", "/api/v1/chats/00000000000000000000000000000000"),
        ("GET", "/api/v1/chats/not-a-uuid/stream"),
        ("GET", "/api/v1/chats/not-a-uuid/ws"),
        ("PATCH", f"/api/v1/chats/{chat_id}/messages/abc"),
        ("PATCH", f"/api/v1/chats/{chat_id}/messages/0"),
        ("PATCH", f"/api/v1/chats/{chat_id}/messages/-1"),
        ("PATCH", f"/api/v1/chats/{chat_id}/messages/99999999999999999999"),
        ("DELETE", f"/api/v1/chats/{chat_id}/queue/1.5"),
        ("POST", f"/api/v1/chats/{chat_id}/queue/%00/promote"),
        ("PATCH", "/api/v1/model-configs/xyz"),
    ]:
        status, error = await _raw(api, admin, method, path, _json({"content": "x"}))
        assert status == 400, (method, path, error)
        ErrorBody.model_validate(error)
    assert await _counts(api) == before


async def test_bad_query_parameters_answer_400(api: ApiInstance, admin: ApiUser) -> None:
    chat_id = await _chat(api, admin)
    for path in [
        "/api/v1/chats?limit=0",
        "/api/v1/chats?limit=1000",
        "/api/v1/chats?limit=ten",
        "/api/v1/chats?status=sleeping",
        "/api/v1/chats?archived=maybe",
        "/api/v1/chats?before=garbage",
        "/api/v1/chats?limit=1&limit=2",
        f"/api/v1/chats/{chat_id}/messages?after_id=-1",
        f"/api/v1/chats/{chat_id}/messages?after_id=99999999999999999999",
        f"/api/v1/chats/{chat_id}/messages?limit=%00",
        f"/api/v1/chats/{chat_id}/stream?after=1",
        f"/api/v1/chats/{chat_id}/stream?after=a:b",
        f"/api/v1/chats/{chat_id}/stream?after=99999999999999999999:0",
        f"/api/v1/chats/{chat_id}/ws?after=-1:0",
    ]:
        status, error = await _raw(api, admin, "GET", path)
        assert status == 400, (path, error)
        ErrorBody.model_validate(error)
    # Unknown query parameters are ignored.
    status, _ = await _raw(api, admin, "GET", "/api/v1/chats?cache_buster=1")
    assert status == 200


async def test_a_bad_last_event_id_answers_400(api: ApiInstance, admin: ApiUser) -> None:
    chat_id = await _chat(api, admin)
    async with api.client.get(
        f"/api/v1/chats/{chat_id}/stream",
        headers=admin.headers | {"Last-Event-ID": "yesterday"},
    ) as response:
        assert response.status == 400
        assert (await response.json())["validations"][0]["field"] == "Last-Event-ID"


async def test_patch_bodies_are_validated(api: ApiInstance, admin: ApiUser) -> None:
    chat_id = await _chat(api, admin)
    before = await _counts(api)
    version = await api.pool.fetchval("SELECT version FROM chats WHERE id = $1", uuid.UUID(chat_id))
    for body in [
        {"archived": "yes"},
        {"archived": 1},
        {"title": ["x"]},
        {"status": "waiting"},
        {"owner_id": str(uuid.uuid4())},
    ]:
        status, error = await _raw(api, admin, "PATCH", f"/api/v1/chats/{chat_id}", _json(body))
        assert status == 400, (body, error)
    for body in [
        {"provider": "other", "model": "m"},
        {"provider": "openai", "model": ""},
        {"provider": "openai", "model": "m", "context_limit": 0},
        {"provider": "openai", "model": "m", "context_limit": 2**31},
        {"provider": "openai", "model": "m", "context_limit": "100"},
        {"provider": "openai", "model": "m", "compression_threshold": 101},
        {"provider": "openai", "model": "m", "options": []},
        {"provider": "openai", "model": "m", "options": {"x": 2**70}},
        {"provider": "openai", "model": "m", "is_default": True, "enabled": False},
    ]:
        status, error = await _raw(api, admin, "POST", "/api/v1/model-configs", _json(body))
        assert 400 <= status < 500, (body, error)
    assert await _counts(api) == before
    assert version == await api.pool.fetchval(
        "SELECT version FROM chats WHERE id = $1", uuid.UUID(chat_id)
    )


async def test_unknown_routes_and_methods_answer_json(api: ApiInstance, admin: ApiUser) -> None:
    async with api.client.get("/nope", headers=admin.headers) as response:
        assert response.status == 404
        assert (await response.json())["message"] == "no such route"
    async with api.client.get("/api/v1/chats/x/y/z", headers=admin.headers) as response:
        assert response.status == 404
    async with api.client.delete("/api/v1/chats", headers=admin.headers) as response:
        assert response.status == 405
        body = await response.json()
        assert "GET" in body["detail"] and "POST" in body["detail"]
        assert "GET" in response.headers["Allow"]
    async with api.client.put("/healthz") as response:
        assert response.status == 405
        assert response.content_type == "application/json"
