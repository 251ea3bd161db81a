"""The MCP server routes over real HTTP: admins only, strict validation (400 with what is wrong),
env and header values never shown back, a `[redacted]` value sent back keeps the stored one;
and `mcp_server_ids` on chat creation."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.http.models import ChatOut, McpServerList, McpServerOut
from tests import factories
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, api_instance, call

SERVERS = "/api/v1/mcp-servers"
STDIO = {
    "type": "stdio",
    "command": "mcp-files",
    "args": ["--root", "/srv"],
    "env": {"TOKEN": "t0p"},
}
HTTP = {"type": "http", "url": "https://mcp.example/mcp", "headers": {"Authorization": "Bearer b"}}


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url) as instance:
        yield instance


@pytest.fixture
async def alice(api: ApiInstance) -> ApiUser:
    return await factories.create_api_user(api.pool, name="alice")


@pytest.fixture
async def admin(api: ApiInstance) -> ApiUser:
    return await factories.create_api_user(api.pool, name="root", admin=True)


async def create(api: ApiInstance, admin: ApiUser, **fields: Any) -> McpServerOut:
    status, body = await call(api, admin, "POST", SERVERS, {"transport": STDIO} | fields)
    assert status == 201, body
    return McpServerOut.model_validate(body)


async def stored_transport(api: ApiInstance, server_id: uuid.UUID) -> dict[str, Any]:
    raw = await api.pool.fetchval("SELECT transport FROM mcp_servers WHERE id = $1", server_id)
    return dict(json.loads(raw))


async def test_the_routes_are_for_admins(api: ApiInstance, alice: ApiUser, admin: ApiUser) -> None:
    server = await create(api, admin, name="files")
    path = f"{SERVERS}/{server.id}"
    for method, target, body in (
        ("GET", SERVERS, None),
        ("POST", SERVERS, {"name": "mine", "transport": STDIO}),
        ("PATCH", path, {"enabled": False}),
        ("DELETE", path, None),
    ):
        status, answer = await call(api, alice, method, target, body)
        assert status == 403, (method, answer)
        assert answer["message"] == "this route is for admins"
    async with api.client.get(SERVERS) as response:
        assert response.status == 401
    _, listing = await call(api, admin, "GET", SERVERS)
    assert [s.enabled for s in McpServerList.model_validate(listing).mcp_servers] == [True]


async def test_secrets_are_never_shown_back(api: ApiInstance, admin: ApiUser) -> None:
    files = await create(api, admin, name="files")
    web = await create(api, admin, name="web", transport=HTTP, allow_tools=["search"])
    assert files.transport.model_dump() == STDIO | {"env": {"TOKEN": "[redacted]"}}
    assert web.transport.model_dump() == HTTP | {"headers": {"Authorization": "[redacted]"}}
    assert (web.allow_tools, web.deny_tools, web.call_timeout_s) == (["search"], [], None)

    status, listing = await call(api, admin, "GET", SERVERS)
    assert status == 200
    text = json.dumps(listing)
    assert "t0p" not in text and "Bearer b" not in text
    assert [s.name for s in McpServerList.model_validate(listing).mcp_servers] == ["files", "web"]
    assert (await stored_transport(api, web.id))["headers"] == {"Authorization": "Bearer b"}


async def test_sending_the_redacted_transport_back_keeps_the_secrets(
    api: ApiInstance, admin: ApiUser
) -> None:
    server = await create(api, admin, name="files")
    shown = server.transport.model_dump()
    shown["args"] = ["--root", "/data"]
    shown["env"] |= {"REGION": "eu"}
    status, body = await call(
        api, admin, "PATCH", f"{SERVERS}/{server.id}", {"transport": shown, "call_timeout_s": 5}
    )
    assert status == 200, body
    updated = McpServerOut.model_validate(body)
    assert updated.version == server.version + 1
    assert updated.transport.model_dump()["env"] == {"TOKEN": "[redacted]", "REGION": "[redacted]"}
    assert updated.call_timeout_s == 5.0
    assert await stored_transport(api, server.id) == STDIO | {
        "args": ["--root", "/data"],
        "env": {"TOKEN": "t0p", "REGION": "eu"},
    }
    # A new value replaces it; null clears the timeout; absent fields stay.
    status, body = await call(
        api,
        admin,
        "PATCH",
        f"{SERVERS}/{server.id}",
        {"transport": STDIO | {"env": {"TOKEN": "new"}}, "call_timeout_s": None},
    )
    assert status == 200 and body["call_timeout_s"] is None and body["name"] == "files"
    assert (await stored_transport(api, server.id))["env"] == {"TOKEN": "new"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Files", "transport": STDIO}, "name"),
        ({"name": "my__files", "transport": STDIO}, "name"),
        ({"name": "files_", "transport": STDIO}, "name"),
        ({"name": "x" * 25, "transport": STDIO}, "name"),
        ({"name": "files"}, "transport"),
        ({"name": "files", "transport": {"type": "ftp", "url": "ftp://x"}}, "transport"),
        ({"name": "files", "transport": {"type": "http"}}, "transport.http.url"),
        (
            {"name": "files", "transport": HTTP | {"url": "file:///etc/passwd"}},
            "transport.http.url",
        ),
        ({"name": "files", "transport": HTTP | {"url": "https://u:p@h/mcp"}}, "transport.http.url"),
        ({"name": "files", "transport": STDIO | {"command": "  "}}, "transport.stdio.command"),
        ({"name": "files", "transport": STDIO | {"env": {"A-B": "1"}}}, "transport.stdio.env.A-B"),
        ({"name": "files", "transport": STDIO | {"env": {"A": 1}}}, "transport.stdio.env.A"),
        ({"name": "files", "transport": HTTP | {"headers": {"X": "a\r\nB: c"}}}, "transport"),
        (
            {"name": "files", "transport": HTTP | {"headers": {"Host": "h"}}},
            "transport.headers.Host",
        ),
        (
            {"name": "files", "transport": HTTP | {"headers": {"X": "[redacted]"}}},
            "transport.headers.X",
        ),
        ({"name": "files", "transport": STDIO, "call_timeout_s": 0}, "call_timeout_s"),
        ({"name": "files", "transport": STDIO, "call_timeout_s": "5"}, "call_timeout_s"),
        ({"name": "files", "transport": STDIO, "allow_tools": [""]}, "allow_tools.0"),
        ({"name": "files", "transport": STDIO, "deny_tools": None}, "deny_tools"),
        ({"name": "files", "transport": STDIO, "admin": True}, "admin"),
    ],
)
async def test_invalid_servers_are_refused_with_what_is_wrong(
    api: ApiInstance, admin: ApiUser, body: dict[str, Any], field: str
) -> None:
    status, answer = await call(api, admin, "POST", SERVERS, body)
    assert status == 400, answer
    fields = [v["field"] for v in answer.get("validations") or []]
    assert any(f.startswith(field) for f in fields), (field, answer)
    assert await api.pool.fetchval("SELECT count(*) FROM mcp_servers") == 0


async def test_conflicts_and_unknown_servers(api: ApiInstance, admin: ApiUser) -> None:
    await create(api, admin, name="files")
    other = await create(api, admin, name="other")
    status, body = await call(api, admin, "POST", SERVERS, {"name": "files", "transport": STDIO})
    assert status == 409 and "files" in body["message"]
    status, body = await call(api, admin, "PATCH", f"{SERVERS}/{other.id}", {"name": "files"})
    assert status == 409
    missing = f"{SERVERS}/{uuid.uuid4()}"
    assert (await call(api, admin, "PATCH", missing, {"enabled": False}))[0] == 404
    assert (await call(api, admin, "DELETE", missing))[0] == 404
    assert (await call(api, admin, "DELETE", f"{SERVERS}/{other.id}"))[0] == 204
    assert (await call(api, admin, "DELETE", f"{SERVERS}/{other.id}"))[0] == 404
    # The redacted marker needs a stored value of its name.
    status, body = await call(
        api,
        admin,
        "PATCH",
        f"{SERVERS}/{(await create(api, admin, name='web', transport=HTTP)).id}",
        {"transport": STDIO | {"env": {"TOKEN": "[redacted]"}}},
    )
    assert status == 400 and body["validations"][0]["field"] == "transport.env.TOKEN"


async def test_a_chat_chooses_its_servers_at_creation(
    api: ApiInstance, alice: ApiUser, admin: ApiUser
) -> None:
    server = await create(api, admin, name="files")
    status, body = await call(
        api, alice, "POST", "/api/v1/chats", {"content": "hi", "mcp_server_ids": [str(server.id)]}
    )
    assert status == 201, body
    chat = ChatOut.model_validate(body)
    stored = await api.pool.fetchval("SELECT mcp_server_ids FROM chats WHERE id = $1", chat.id)
    assert stored == [server.id]
    _, body = await call(api, alice, "POST", "/api/v1/chats", {"content": "hi"})
    assert (
        await api.pool.fetchval(
            "SELECT mcp_server_ids FROM chats WHERE id = $1", uuid.UUID(body["id"])
        )
        is None
    )

    missing = uuid.uuid4()
    for ids, detail in (
        ([str(missing)], f"no MCP server {missing}"),
        (["not-a-uuid"], "Input should be a valid UUID"),
    ):
        status, body = await call(
            api, alice, "POST", "/api/v1/chats", {"content": "hi", "mcp_server_ids": ids}
        )
        assert status == 400
        assert body["validations"][0]["field"].startswith("mcp_server_ids")
        assert detail in body["validations"][0]["detail"]
