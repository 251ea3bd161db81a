"""The OpenAPI document describes every route of the router (and nothing else), its references
resolve, and its request schemas are those of the models that validate requests."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.http.models import CreateChatRequest, ListChatsQuery
from app.http.server import OPENAPI, all_routes
from tests.http_harness import ApiInstance, api_instance, make_user

PUBLIC = {"/healthz", "/readyz", "/metrics"}


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url) as instance:
        yield instance


@pytest.fixture
async def document(api: ApiInstance) -> dict[str, Any]:
    user = await make_user(api.pool)
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
