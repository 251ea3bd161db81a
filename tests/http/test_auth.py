"""Authentication and ownership: every route but /healthz, /readyz and /metrics needs a valid
bearer token (401 JSON otherwise); another user's chat answers 404 on every route, streams
included; model-config writes are for admins (403); tokens are stored as SHA-256 only."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from app import cli
from app.config import local_token_path
from app.http.auth import ensure_local_token
from app.http.web_endpoints import INDEX, STATIC_FILES
from tests import factories
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, api_instance

PUBLIC = {"/healthz", "/readyz", "/metrics"}
# The web page and its files load before anyone is logged in (docs/web.md).
PUBLIC |= {"/", "/login", *(f"/static/{name}" for name in STATIC_FILES if name != INDEX)}
# Logging in takes its credentials in the body (tests/http/test_sessions.py).
LOGIN = {"/api/v1/sessions", "/api/v1/sessions/login-code"}
SAMPLE_BODY = {"content": "hello", "title": "t", "provider": "builtin", "model": "echo"}


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url) as instance:
        yield instance


def _routes(app: web.Application) -> list[tuple[str, str]]:
    routes = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert isinstance(path, str)
        routes.append((route.method, path))
    return routes


def _fill(path: str, chat_id: uuid.UUID) -> str:
    return re.sub(r"\{id\}", str(chat_id), path).replace("{mid}", "1").replace("{qid}", "1")


async def test_every_route_but_the_public_ones_needs_a_valid_token(api: ApiInstance) -> None:
    routes = _routes(api.app)
    assert len(routes) > 15
    chat_id = uuid.uuid4()
    for method, path in routes:
        url = _fill(path, chat_id)
        for headers in (
            {},
            {"Authorization": "Bearer chatd_not-a-real-token"},
            {"Authorization": "Basic dXNlcjpwYXNz"},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer " + "x" * 5000},
        ):
            async with api.client.request(method, url, headers=headers, json=SAMPLE_BODY) as r:
                if path in PUBLIC:
                    assert r.status in (200, 503), (method, path)
                    continue
                if path in LOGIN:
                    assert r.status in (400, 401), (method, path)
                    continue
                assert r.status == 401, (method, path, headers, await r.text())
                assert r.content_type == "application/json"
                assert (await r.json())["message"]
                assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_another_users_chat_answers_404_on_every_chat_route(api: ApiInstance) -> None:
    alice = await factories.create_api_user(api.pool, name="alice")
    mallory = await factories.create_api_user(api.pool, name="mallory")
    async with api.client.post(
        "/api/v1/chats", json={"content": "secret"}, headers=alice.headers
    ) as response:
        alices_chat = uuid.UUID((await response.json())["id"])
    chat_routes = [(m, p) for m, p in _routes(api.app) if p.startswith("/api/v1/chats/{id}")]
    assert len(chat_routes) >= 10  # incl. stream and ws
    for method, path in chat_routes:
        url = _fill(path, alices_chat)
        body: dict[str, Any] = {"content": "x"}
        if path == "/api/v1/chats/{id}":
            body = {"title": "x"}
        elif path.endswith("/tool-results"):
            body = {"results": [{"tool_call_id": "call_1", "result": "x"}]}
        async with api.client.request(method, url, headers=mallory.headers, json=body) as response:
            assert response.status == 404, (method, path, await response.text())
            assert (await response.json())["message"] == "chat not found"
    async with api.client.get("/api/v1/chats", headers=mallory.headers) as response:
        assert (await response.json())["chats"] == []
    # Nothing of alice's changed.
    row = await api.pool.fetchrow("SELECT title, version FROM chats WHERE id = $1", alices_chat)
    assert row is not None and row["version"] == 1 and row["title"] == "secret"


async def test_model_config_writes_are_for_admins(api: ApiInstance) -> None:
    user = await factories.create_api_user(api.pool)
    config = "00000000-0000-0000-0000-0000000000e0"
    for method, path in [
        ("POST", "/api/v1/model-configs"),
        ("PATCH", f"/api/v1/model-configs/{config}"),
        ("DELETE", f"/api/v1/model-configs/{config}"),
    ]:
        async with api.client.request(
            method, path, headers=user.headers, json={"provider": "openai", "model": "m"}
        ) as response:
            assert response.status == 403, (method, path)
            assert (await response.json())["message"] == "this route is for admins"
    async with api.client.get("/api/v1/model-configs", headers=user.headers) as response:
        assert response.status == 200


async def test_tokens_are_stored_hashed_and_touched(api: ApiInstance) -> None:
    user = await factories.create_api_user(api.pool)
    assert user.token.startswith("chatd_") and len(user.token) > 40
    rows = await api.pool.fetch("SELECT token_hash, last_used_at FROM api_tokens")
    assert [bytes(r["token_hash"]) for r in rows] == [hashlib.sha256(user.token.encode()).digest()]
    assert rows[0]["last_used_at"] is None
    dump = await api.pool.fetchval("SELECT string_agg(t::text, ' ') FROM api_tokens t")
    assert user.token not in dump

    async with api.client.get("/api/v1/chats", headers=user.headers) as response:
        assert response.status == 200
    assert await api.pool.fetchval("SELECT last_used_at FROM api_tokens") is not None


async def test_token_create_command_prints_only_the_token(
    database_url: str,
    api: ApiInstance,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    # main() points the root logger at the (captured) stderr; keep the suite's logging as it is.
    monkeypatch.setattr(cli, "configure_logging", lambda *_args: None)
    assert await asyncio.to_thread(cli.main, ["token", "create", "carol", "--admin"]) == 0
    out = capsys.readouterr().out
    token = out.strip()
    assert out == token + "\n" and re.fullmatch(r"chatd_[A-Za-z0-9_-]{43}", token)
    async with api.client.post(
        "/api/v1/model-configs",
        json={"provider": "openai", "model": "m"},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        assert response.status == 201  # carol is an admin

    # A second token for the same user; no --admin does not demote.
    assert await asyncio.to_thread(cli.main, ["token", "create", "carol"]) == 0
    assert capsys.readouterr().out.strip() != token
    users = await api.pool.fetch("SELECT name, is_admin FROM users WHERE name = 'carol'")
    assert [(u["name"], u["is_admin"]) for u in users] == [("carol", True)]
    assert await api.pool.fetchval("SELECT count(*) FROM api_tokens") == 2

    assert await asyncio.to_thread(cli.main, ["token", "create", " "]) == 2


async def test_ensure_local_token_creates_once_and_reuses(api: ApiInstance, tmp_path: Path) -> None:
    token = await ensure_local_token(api.pool, tmp_path)
    path = local_token_path(tmp_path)
    assert path.read_text().strip() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert await ensure_local_token(api.pool, tmp_path) == token
    async with api.client.get(
        "/api/v1/chats", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 200
    # The database lost it (a reset): a new one replaces the stale file.
    await api.pool.execute("DELETE FROM api_tokens")
    renewed = await ensure_local_token(api.pool, tmp_path)
    assert renewed != token and path.read_text().strip() == renewed
    users = await api.pool.fetch("SELECT name, is_admin FROM users")
    assert [(u["name"], u["is_admin"]) for u in users] == [("local", True)]


async def test_the_owner_is_built_from_the_authenticated_user(api: ApiInstance) -> None:
    org = (await factories.create_organization(api.pool, name="acme"))["id"]
    user: ApiUser = await factories.create_api_user(api.pool)
    await api.pool.execute("UPDATE users SET organization_id = $1 WHERE id = $2", org, user.id)
    async with api.client.post(
        "/api/v1/chats", json={"content": "hi"}, headers=user.headers
    ) as response:
        assert response.status == 201
        chat_id = uuid.UUID((await response.json())["id"])
    row = await api.pool.fetchrow(
        "SELECT owner_id, organization_id FROM chats WHERE id = $1", chat_id
    )
    assert row is not None and (row["owner_id"], row["organization_id"]) == (user.id, org)
