"""The OpenAPI document describes every route of the router (and nothing else), its references
resolve, and its request schemas are those of the models that validate requests."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from app.http import models as http_models
from app.http.keys import OPENAPI
from app.http.models import CreateChatRequest, ErrorBody, LimitBody, ListChatsQuery, SpendLimitBody
from app.http.routes import all_routes
from app.http.web_endpoints import INDEX, STATIC_FILES
from tests import factories
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, api_instance

# The web page and its files load before anyone is logged in; logging in needs no session.
WEB_PUBLIC = {"/", "/login", *(f"/static/{name}" for name in STATIC_FILES if name != INDEX)}
SESSION_PUBLIC = {"/api/v1/sessions", "/api/v1/sessions/login-code"}
PUBLIC = {"/healthz", "/readyz", "/metrics", *WEB_PUBLIC, *SESSION_PUBLIC}


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url) as instance:
        yield instance


@pytest.fixture
async def document(api: ApiInstance) -> dict[str, Any]:
    user = await factories.create_api_user(api.pool)
    async with api.client.get("/api/v1/openapi.json", headers=user.headers) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
    return body


def _router_operations(api: ApiInstance) -> set[tuple[str, str]]:
    operations = set()
    for route in api.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert isinstance(path, str)
        operations.add((route.method.lower(), path))
    return operations


async def test_every_route_in_the_router_is_documented_and_nothing_else(
    api: ApiInstance, document: dict[str, Any]
) -> None:
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert _router_operations(api) == documented
    assert len(documented) == len(all_routes())


async def test_authentication_is_documented_as_enforced(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for operation in item.values():
            public = operation["security"] == []
            assert public == (path in PUBLIC), path
            if not public:
                assert "401" in operation["responses"], path


async def test_every_reference_resolves(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                match = re.fullmatch(r"#/components/schemas/(.+)", ref)
                assert match and match[1] in schemas, ref
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)


async def test_request_schemas_are_the_validating_models(document: dict[str, Any]) -> None:
    create = document["paths"]["/api/v1/chats"]["post"]
    ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    expected = CreateChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    assert schema["properties"] == expected["properties"]
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["content"]

    listing = document["paths"]["/api/v1/chats"]["get"]
    names = {p["name"] for p in listing["parameters"] if p["in"] == "query"}
    assert names == set(ListChatsQuery.model_fields)


async def test_the_served_document_is_the_generated_one(
    api: ApiInstance, document: dict[str, Any]
) -> None:
    assert document == api.app[OPENAPI]
    assert document["openapi"] == "3.1.0"
    stream = document["paths"]["/api/v1/chats/{id}/stream"]["get"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert {p["name"] for p in stream["parameters"]} == {"id", "after", "Last-Event-ID"}


# --------------------------------------------------------------------------------------------
# The document says what the server does: every body an answer can carry is declared (a body
# matches exactly one declared model), and what the document accepts the server accepts.


def _declared(
    document: dict[str, Any], path: str, method: str, status: int
) -> list[type[BaseModel]]:
    response = document["paths"][path][method]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    refs = [item["$ref"] for item in schema.get("oneOf", [schema])]
    return [getattr(http_models, ref.rsplit("/", 1)[1]) for ref in refs]


def _matches_exactly_one(body: Any, declared: list[type[BaseModel]]) -> type[BaseModel]:
    matched = []
    for model in declared:
        try:
            model.model_validate(body)
        except ValidationError:
            continue
        matched.append(model)
    assert len(matched) == 1, (body, declared, matched)
    return matched[0]


async def _call(
    api: ApiInstance, user: ApiUser, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with api.client.request(method, path, json=body, headers=user.headers) as response:
        return response.status, await response.json() if response.status != 204 else None


async def test_both_conflicts_of_send_message_are_declared(
    api: ApiInstance, document: dict[str, Any]
) -> None:
    user = await factories.create_api_user(api.pool)
    path = "/api/v1/chats/{id}/messages"
    _, chat = await _call(api, user, "POST", "/api/v1/chats", {"content": "hi"})
    await _call(api, user, "PATCH", f"/api/v1/chats/{chat['id']}", {"archived": True})
    status, archived = await _call(
        api, user, "POST", f"/api/v1/chats/{chat['id']}/messages", {"content": "x"}
    )
    assert status == 409
    assert _matches_exactly_one(archived, _declared(document, path, "post", 409)) is ErrorBody

    _, chat = await _call(api, user, "POST", "/api/v1/chats", {"content": "hi"})
    async with api.pool.acquire() as conn:
        await factories.create_spend_limit(conn, user_id=user.id, limit_micros=1)
        await factories.record_spend(conn, chat_id=uuid.UUID(chat["id"]), cost_micros=1)
    status, spent = await _call(
        api, user, "POST", f"/api/v1/chats/{chat['id']}/messages", {"content": "x"}
    )
    assert status == 409
    assert _matches_exactly_one(spent, _declared(document, path, "post", 409)) is SpendLimitBody


async def test_every_429_is_declared_with_its_body(database_url: str) -> None:
    async with api_instance(
        database_url, queue_limit=1, max_pending_chats_per_user=1, max_chats_per_user=2
    ) as api:
        document = api.app[OPENAPI]
        user = await factories.create_api_user(api.pool)
        seen: list[tuple[str, type[BaseModel]]] = []

        async def expect_429(method: str, template: str, path: str, body: Any = None) -> None:
            status, answer = await _call(api, user, method, path, body)
            assert status == 429, (path, answer)
            declared = _declared(document, template, method.lower(), 429)
            seen.append((template, _matches_exactly_one(answer, declared)))

        _, first = await _call(api, user, "POST", "/api/v1/chats", {"content": "one"})
        first_path = f"/api/v1/chats/{first['id']}"
        await expect_429("POST", "/api/v1/chats", "/api/v1/chats", {"content": "two"})
        status, _ = await _call(api, user, "POST", f"{first_path}/messages", {"content": "q"})
        assert status == 202
        messages = "/api/v1/chats/{id}/messages"
        await expect_429("POST", messages, f"{first_path}/messages", {"content": "q2"})

        # The first chat stops (its queued message stays); a second chat takes the pending slot.
        await _call(api, user, "POST", f"{first_path}/interrupt")
        _, second = await _call(api, user, "POST", "/api/v1/chats", {"content": "two"})
        await expect_429("POST", messages, f"{first_path}/messages", {"content": "q3"})
        _, page = await _call(api, user, "GET", f"{first_path}/messages")
        message_id, queued_id = page["messages"][0]["id"], page["queued"][0]["id"]
        await expect_429(
            "PATCH",
            "/api/v1/chats/{id}/messages/{mid}",
            f"{first_path}/messages/{message_id}",
            {"content": "edited"},
        )
        await expect_429(
            "POST",
            "/api/v1/chats/{id}/queue/{qid}/promote",
            f"{first_path}/queue/{queued_id}/promote",
        )
        # Two chats is the most: archive one, make another, unarchiving is one too many.
        await _call(api, user, "PATCH", first_path, {"archived": True})
        await _call(api, user, "POST", f"/api/v1/chats/{second['id']}/interrupt")
        status, _ = await _call(api, user, "POST", "/api/v1/chats", {"content": "three"})
        assert status == 201
        await expect_429("PATCH", "/api/v1/chats/{id}", first_path, {"archived": False})

    assert (messages, ErrorBody) in seen  # QueueFull
    assert (messages, LimitBody) in seen  # LimitReached
    assert {template for template, _ in seen} == {
        "/api/v1/chats",
        messages,
        "/api/v1/chats/{id}/messages/{mid}",
        "/api/v1/chats/{id}/queue/{qid}/promote",
        "/api/v1/chats/{id}",
    }


def _integer_nodes(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        if node.get("type") == "integer":
            found.append(node)
        for value in node.values():
            found += _integer_nodes(value)
    elif isinstance(node, list):
        for value in node:
            found += _integer_nodes(value)
    return found


async def test_integers_are_written_in_digits_says_the_document_and_the_server(
    api: ApiInstance, document: dict[str, Any]
) -> None:
    nodes = _integer_nodes(document)
    assert nodes and all(node.get("x-digits-only") is True for node in nodes)

    user = await factories.create_api_user(api.pool)
    admin = await factories.create_api_user(api.pool, admin=True)
    _, chat = await _call(api, user, "POST", "/api/v1/chats", {"content": "hi"})
    for query in (
        "/api/v1/chats?limit=10.0",
        "/api/v1/chats?limit=1e1",
        "/api/v1/chats?limit=%2B1",
        "/api/v1/chats?limit=%201",
        "/api/v1/chats?limit=1_0",
        f"/api/v1/chats/{chat['id']}/messages?after_id=0.0",
        f"/api/v1/chats/{chat['id']}/messages?limit=5.0",
    ):
        status, body = await _call(api, user, "GET", query)
        assert status == 400, (query, body)
    status, _ = await _call(api, user, "GET", "/api/v1/chats?limit=10")
    assert status == 200
    for field, value in (("context_limit", 1000.0), ("compression_threshold", 50.0)):
        status, body = await _call(
            api,
            admin,
            "POST",
            "/api/v1/model-configs",
            {"provider": "builtin", "model": "echo", field: value},
        )
        assert status == 400, (field, body)


def _content_schemas(document: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    content = document["components"]["schemas"]["SendMessageRequest"]["properties"]["content"]
    text, parts = content["anyOf"]
    assert text["type"] == "string" and parts["type"] == "array"
    return text, parts


async def test_blank_content_is_refused_by_the_document_and_the_server(
    api: ApiInstance, document: dict[str, Any]
) -> None:
    text_schema, parts_schema = _content_schemas(document)
    text_pattern = re.compile(text_schema["pattern"])
    part_pattern = re.compile(parts_schema["contains"]["properties"]["text"]["pattern"])
    user = await factories.create_api_user(api.pool)
    blank_texts = ["", " ", "\n\t ", "\u3000\u00a0", "\ufeff"]
    for blank in blank_texts:
        parts = [{"type": "text", "text": blank}, {"type": "text", "text": ""}]
        assert not any(part_pattern.search(part["text"]) for part in parts)  # schema: no
        status, _ = await _call(api, user, "POST", "/api/v1/chats", {"content": parts})
        assert status == 400, repr(blank)  # server: no
        assert not text_pattern.search(blank)
        status, _ = await _call(api, user, "POST", "/api/v1/chats", {"content": blank})
        assert status == 400, repr(blank)
    parts = [{"type": "text", "text": " "}, {"type": "text", "text": "x"}]
    assert any(part_pattern.search(part["text"]) for part in parts)
    status, _ = await _call(api, user, "POST", "/api/v1/chats", {"content": parts})
    assert status == 201


async def test_every_cursor_the_document_accepts_the_server_accepts(
    api: ApiInstance, document: dict[str, Any]
) -> None:
    listing = document["paths"]["/api/v1/chats"]["get"]["parameters"]
    before = next(p for p in listing if p["name"] == "before")["schema"]["anyOf"][0]
    pattern = re.compile(before["pattern"])
    user = await factories.create_api_user(api.pool)
    for cursor, accepted in (
        ("0:00000000-0000-0000-0000-000000000000", True),
        ("99999999999999999:ffffffff-ffff-ffff-ffff-ffffffffffff", True),
        ("garbage", False),
        ("MjAyNi0wMS0wMXx4", False),
        ("1:2", False),
        ("999999999999999999:00000000-0000-0000-0000-000000000000", False),
    ):
        assert bool(pattern.search(cursor)) == accepted, cursor
        status, _ = await _call(api, user, "GET", f"/api/v1/chats?before={cursor}")
        assert status == (200 if accepted else 400), cursor

    # And the cursors the server hands out page through everything.
    for i in range(3):
        await _call(api, user, "POST", "/api/v1/chats", {"content": f"c{i}"})
    seen: list[str] = []
    path = "/api/v1/chats?limit=2"
    while True:
        status, page = await _call(api, user, "GET", path)
        assert status == 200
        seen += [chat["id"] for chat in page["chats"]]
        if page["next"] is None:
            break
        assert pattern.search(page["next"])
        path = f"/api/v1/chats?limit=2&before={page['next']}"
    assert len(seen) == len(set(seen)) == 3
