"""Browser sessions over real HTTP against a real database (docs/web.md): logging in with a
token or a one-time code sets a hardened cookie; the cookie opens every route a bearer token
does, streams included; requests that change state need the CSRF token; cross-origin requests
are refused; logging out and expiry end a session; and the page itself is served with its
security headers.

Cookies are handled by hand (a client without a cookie jar), so each request says exactly
which credentials it carries."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http.cookies import Morsel
from typing import Any

import aiohttp
import pytest

from app.config import Settings
from app.http import sessions
from app.http.models import SessionOut
from app.http.web_endpoints import CONTENT_SECURITY_POLICY, STATIC_FILES
from tests import factories
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, api_instance, new_chat_id

COOKIE = sessions.COOKIE_NAME


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url) as instance:
        yield instance


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps no cookies: every request carries what the test gives it."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=20)
    ) as session:
        yield session


@pytest.fixture
def client(api: ApiInstance, http: aiohttp.ClientSession) -> Client:
    return Client(http, api)


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]
    cookies: dict[str, Morsel[str]]


@dataclass
class Browser:
    """A logged-in browser: its session cookie and the CSRF token the page would keep."""

    cookie: str
    csrf_token: str
    body: dict[str, Any]

    def headers(self, *, csrf: bool = True) -> dict[str, str]:
        headers = {"Cookie": f"{COOKIE}={self.cookie}"}
        if csrf:
            headers[sessions.CSRF_HEADER] = self.csrf_token
        return headers


@dataclass
class Client:
    """Requests to the instance through the cookie-less client."""

    http: aiohttp.ClientSession
    api: ApiInstance

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Answer:
        async with self.http.request(
            method, self.api.url(path), json=body, headers=headers or {}
        ) as response:
            payload = None
            if response.content_type == "application/json":
                payload = await response.json()
            return Answer(
                response.status, payload, dict(response.headers), dict(response.cookies.items())
            )


async def log_in(client: Client, user: ApiUser) -> Browser:
    answer = await client.request("POST", "/api/v1/sessions", {"token": user.token})
    assert answer.status == 201, answer.body
    return Browser(answer.cookies[COOKIE].value, answer.body["csrf_token"], answer.body)


# --------------------------------------------------------------------------------------------
# Logging in.


async def test_logging_in_with_a_token_sets_a_hardened_cookie_stored_hashed(
    api: ApiInstance, client: Client
) -> None:
    user = await factories.create_api_user(api.pool, name="alice")
    answer = await client.request("POST", "/api/v1/sessions", {"token": user.token})
    assert answer.status == 201
    session = SessionOut.model_validate(answer.body)
    assert session.user.id == user.id and session.user.name == "alice"
    assert answer.headers["Cache-Control"] == "no-store"

    cookie = answer.cookies[COOKIE]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/"
    assert not cookie["secure"]  # plain http, no https public URL
    assert int(cookie["max-age"]) == int(api.settings.session_ttl_s)
    assert len(cookie.value) >= 40

    rows = await api.pool.fetch("SELECT token_hash, csrf_token, user_id FROM browser_sessions")
    assert len(rows) == 1
    assert bytes(rows[0]["token_hash"]) == hashlib.sha256(cookie.value.encode()).digest()
    assert rows[0]["csrf_token"] == session.csrf_token != cookie.value
    dump = await api.pool.fetchval("SELECT string_agg(s::text, ' ') FROM browser_sessions s")
    assert cookie.value not in dump


@pytest.mark.parametrize(
    "token", ["chatd_not-a-real-token", " ", "x" * 200, "bad\x01token", "ünïcode"]
)
async def test_a_token_that_is_not_valid_is_a_401_without_a_cookie(
    api: ApiInstance, client: Client, token: str
) -> None:
    answer = await client.request("POST", "/api/v1/sessions", {"token": token})
    assert answer.status == 401
    assert answer.body["message"]
    assert COOKIE not in answer.cookies
    assert await api.pool.fetchval("SELECT count(*) FROM browser_sessions") == 0


async def test_a_malformed_login_body_is_a_400(api: ApiInstance, client: Client) -> None:
    for body in ({}, {"token": 1}, {"token": ""}, {"token": "t", "admin": True}):
        answer = await client.request("POST", "/api/v1/sessions", body)
        assert answer.status == 400, body
        assert COOKIE not in answer.cookies


async def test_the_cookie_is_secure_when_the_public_url_is_https(
    database_url: str, http: aiohttp.ClientSession
) -> None:
    async with api_instance(database_url, public_url="https://chat.example.com") as api:
        user = await factories.create_api_user(api.pool)
        answer = await Client(http, api).request("POST", "/api/v1/sessions", {"token": user.token})
        assert answer.status == 201
        assert answer.cookies[COOKIE]["secure"] is True


# --------------------------------------------------------------------------------------------
# What the cookie opens.


async def test_the_cookie_opens_the_rest_routes_the_stream_and_the_watch(
    api: ApiInstance, client: Client
) -> None:
    user = await factories.create_api_user(api.pool)
    browser = await log_in(client, user)

    created = await client.request(
        "POST", "/api/v1/chats", {"content": "from the page"}, browser.headers()
    )
    assert created.status == 201, created.body
    chat_id = created.body["id"]
    assert created.body["owner_id"] == str(user.id)

    listing = await client.request("GET", "/api/v1/chats", headers=browser.headers(csrf=False))
    assert listing.status == 200
    assert [chat["id"] for chat in listing.body["chats"]] == [chat_id]

    async with client.http.get(
        client.api.url(f"/api/v1/chats/{chat_id}/stream"), headers=browser.headers(csrf=False)
    ) as stream:
        assert stream.status == 200
        assert stream.content_type == "text/event-stream"
        async with asyncio.timeout(10):
            while b'"from the page"' not in await stream.content.readline():
                pass

    async with client.http.get(
        api.url("/api/v1/chats/watch"), headers=browser.headers(csrf=False)
    ) as watch:
        assert watch.status == 200
        assert watch.content_type == "text/event-stream"


async def test_another_users_chat_answers_404_to_the_cookie_too(
    api: ApiInstance, client: Client
) -> None:
    alice = await factories.create_api_user(api.pool, name="alice")
    mallory = await factories.create_api_user(api.pool, name="mallory")
    alices_chat = await new_chat_id(api, alice, "secret")
    browser = await log_in(client, mallory)
    for method, path in [
        ("GET", f"/api/v1/chats/{alices_chat}"),
        ("GET", f"/api/v1/chats/{alices_chat}/messages"),
        ("GET", f"/api/v1/chats/{alices_chat}/stream"),
        ("POST", f"/api/v1/chats/{alices_chat}/interrupt"),
        ("PATCH", f"/api/v1/chats/{alices_chat}"),
    ]:
        body = {"archived": True} if method == "PATCH" else None
        answer = await client.request(method, path, body, browser.headers())
        assert answer.status == 404, (method, path, answer.body)
    row = await api.pool.fetchrow("SELECT archived, status FROM chats WHERE id = $1", alices_chat)
    assert row is not None and row["archived"] is False and row["status"] == "pending"


async def test_a_bearer_header_wins_over_the_cookie_and_needs_no_csrf_token(
    api: ApiInstance, client: Client
) -> None:
    alice = await factories.create_api_user(api.pool, name="alice")
    bob = await factories.create_api_user(api.pool, name="bob")
    browser = await log_in(client, alice)
    both = browser.headers(csrf=False) | bob.headers
    created = await client.request("POST", "/api/v1/chats", {"content": "hi"}, both)
    assert created.status == 201
    assert created.body["owner_id"] == str(bob.id)
    # A bearer header that is wrong is refused, even next to a valid cookie.
    wrong = browser.headers() | {"Authorization": "Bearer chatd_wrong"}
    assert (await client.request("GET", "/api/v1/chats", headers=wrong)).status == 401


# --------------------------------------------------------------------------------------------
# CSRF and origins.


async def test_a_state_changing_request_by_cookie_needs_the_csrf_token(
    api: ApiInstance, client: Client
) -> None:
    user = await factories.create_api_user(api.pool)
    browser = await log_in(client, user)
    chat_id = await new_chat_id(api, user, "hello")
    cookie_only = browser.headers(csrf=False)
    wrong = cookie_only | {sessions.CSRF_HEADER: browser.csrf_token[:-1] + "x"}
    attempts: list[tuple[str, str, Any]] = [
        ("POST", "/api/v1/chats", {"content": "x"}),
        ("POST", f"/api/v1/chats/{chat_id}/messages", {"content": "x"}),
        ("PATCH", f"/api/v1/chats/{chat_id}", {"archived": True}),
        ("POST", f"/api/v1/chats/{chat_id}/interrupt", None),
        ("DELETE", "/api/v1/sessions/current", None),
    ]
    for method, path, body in attempts:
        for headers in (cookie_only, wrong, cookie_only | {sessions.CSRF_HEADER: ""}):
            answer = await client.request(method, path, body, headers)
            assert answer.status == 403, (method, path, answer.body)
            assert "CSRF" in answer.body["message"]
    # Nothing was written.
    assert await api.pool.fetchval("SELECT count(*) FROM chats") == 1
    assert await api.pool.fetchval("SELECT count(*) FROM chat_messages") == 1
    row = await api.pool.fetchrow("SELECT status, archived FROM chats")
    assert row is not None and row["status"] == "pending" and row["archived"] is False
    assert await api.pool.fetchval("SELECT count(*) FROM browser_sessions") == 1

    # With the token, each goes through.
    for method, path, body in attempts:
        answer = await client.request(method, path, body, browser.headers())
        assert answer.status in (200, 201, 202, 204), (method, path, answer.body)


async def test_a_request_from_another_origin_is_refused(api: ApiInstance, client: Client) -> None:
    user = await factories.create_api_user(api.pool)
    evil = {"Origin": "https://evil.example"}
    own = {"Origin": f"http://{api.client.host}:{api.client.port}"}

    # Logging in from another site's page (login CSRF) is refused; from this one it works.
    answer = await client.request("POST", "/api/v1/sessions", {"token": user.token}, evil)
    assert answer.status == 403 and COOKIE not in answer.cookies
    null = {"Origin": "null"}
    answer = await client.request("POST", "/api/v1/sessions", {"token": user.token}, null)
    assert answer.status == 403
    answer = await client.request("POST", "/api/v1/sessions", {"token": user.token}, own)
    assert answer.status == 201
    browser = Browser(answer.cookies[COOKIE].value, answer.body["csrf_token"], answer.body)

    # Even with the CSRF token, a cookie request sent by another origin is refused.
    answer = await client.request(
        "POST", "/api/v1/chats", {"content": "x"}, browser.headers() | evil
    )
    assert answer.status == 403
    answer = await client.request(
        "POST", "/api/v1/chats", {"content": "x"}, browser.headers() | own
    )
    assert answer.status == 201


async def test_a_cookie_websocket_must_come_from_this_origin(
    api: ApiInstance, client: Client
) -> None:
    user = await factories.create_api_user(api.pool)
    browser = await log_in(client, user)
    chat_id = await new_chat_id(api, user, "over the socket")
    url = api.url(f"/api/v1/chats/{chat_id}/ws")
    own = f"http://{api.client.host}:{api.client.port}"

    for origin in ("https://evil.example", None):
        headers = browser.headers(csrf=False) | ({"Origin": origin} if origin else {})
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.http.ws_connect(url, headers=headers)
        assert refused.value.status == 403

    async with client.http.ws_connect(
        url, headers=browser.headers(csrf=False) | {"Origin": own}
    ) as ws:
        async with asyncio.timeout(10):
            while "over the socket" not in (await ws.receive_str()):
                pass
    # A bearer token needs no Origin (clients that are not browsers send none).
    async with client.http.ws_connect(url, headers=user.headers) as ws:
        async with asyncio.timeout(10):
            assert "cursor" in await ws.receive_str()


# --------------------------------------------------------------------------------------------
# The current session, logging out, expiry.


async def test_the_current_session_and_logging_out(api: ApiInstance, client: Client) -> None:
    user = await factories.create_api_user(api.pool)
    browser = await log_in(client, user)
    other = await log_in(client, user)  # a second browser of the same user

    current = await client.request(
        "GET", "/api/v1/sessions/current", headers=browser.headers(csrf=False)
    )
    assert current.status == 200
    assert current.body == browser.body

    # Without a session cookie there is no current session, even with a valid bearer token.
    assert (await client.request("GET", "/api/v1/sessions/current")).status == 401
    answer = await client.request("GET", "/api/v1/sessions/current", headers=user.headers)
    assert answer.status == 401

    logout = await client.request("DELETE", "/api/v1/sessions/current", headers=browser.headers())
    assert logout.status == 204
    cleared = logout.cookies[COOKIE]
    assert cleared.value == "" and cleared["max-age"] == "0"
    for path in ("/api/v1/sessions/current", "/api/v1/chats"):
        answer = await client.request("GET", path, headers=browser.headers(csrf=False))
        assert answer.status == 401, path
        assert answer.body["message"]
    # The other browser's session is its own.
    answer = await client.request("GET", "/api/v1/chats", headers=other.headers(csrf=False))
    assert answer.status == 200


async def test_an_expired_session_is_refused_and_swept(api: ApiInstance, client: Client) -> None:
    user = await factories.create_api_user(api.pool)
    browser = await log_in(client, user)
    await api.pool.execute("UPDATE browser_sessions SET expires_at = now() - interval '1 second'")
    answer = await client.request("GET", "/api/v1/chats", headers=browser.headers(csrf=False))
    assert answer.status == 401
    assert "expired" in answer.body["message"]
    # The next login deletes the dead row.
    await log_in(client, user)
    assert await api.pool.fetchval("SELECT count(*) FROM browser_sessions") == 1


# --------------------------------------------------------------------------------------------
# One-time login codes.


async def test_a_login_code_logs_in_once(api: ApiInstance, client: Client) -> None:
    user = await factories.create_api_user(api.pool, name="local")
    code = await sessions.create_login_code(api.pool, user.id, ttl_s=60)
    assert code not in (
        await api.pool.fetchval("SELECT string_agg(c::text, ' ') FROM browser_login_codes c")
    )

    first = await client.request("POST", "/api/v1/sessions/login-code", {"code": code})
    assert first.status == 201
    assert first.body["user"]["name"] == "local"
    cookie = first.cookies[COOKIE]
    assert cookie["httponly"] is True and cookie["samesite"] == "Strict"
    answer = await client.request(
        "GET", "/api/v1/chats", headers={"Cookie": f"{COOKIE}={cookie.value}"}
    )
    assert answer.status == 200

    again = await client.request("POST", "/api/v1/sessions/login-code", {"code": code})
    assert again.status == 401
    assert "already used" in again.body["message"]
    assert COOKIE not in again.cookies


async def test_an_expired_or_unknown_login_code_is_refused(
    api: ApiInstance, client: Client
) -> None:
    user = await factories.create_api_user(api.pool)
    code = await sessions.create_login_code(api.pool, user.id, ttl_s=60)
    await api.pool.execute(
        "UPDATE browser_login_codes SET expires_at = now() - interval '1 second'"
    )
    for attempt in (code, "not-a-code", "x" * 200):
        answer = await client.request("POST", "/api/v1/sessions/login-code", {"code": attempt})
        assert answer.status == 401, attempt
    assert await api.pool.fetchval("SELECT count(*) FROM browser_sessions") == 0


async def test_a_login_code_raced_by_many_requests_logs_in_exactly_once(
    api: ApiInstance, client: Client
) -> None:
    user = await factories.create_api_user(api.pool)
    code = await sessions.create_login_code(api.pool, user.id, ttl_s=60)
    answers = await asyncio.gather(
        *(client.request("POST", "/api/v1/sessions/login-code", {"code": code}) for _ in range(8))
    )
    assert sorted(answer.status for answer in answers) == [201] + [401] * 7
    assert await api.pool.fetchval("SELECT count(*) FROM browser_sessions") == 1


async def test_the_local_login_url_logs_the_local_user_in(api: ApiInstance, client: Client) -> None:
    user = await factories.create_api_user(api.pool, name="local", admin=True)
    settings = Settings(host="0.0.0.0", port=8123)
    url = await sessions.local_login_url(api.pool, settings, user.token)
    prefix = "http://127.0.0.1:8123/login#code="
    assert url.startswith(prefix)
    answer = await client.request(
        "POST", "/api/v1/sessions/login-code", {"code": url.removeprefix(prefix)}
    )
    assert answer.status == 201
    assert answer.body["user"] == {"id": str(user.id), "name": "local", "is_admin": True}


def test_the_login_url_uses_the_public_url_when_set() -> None:
    assert sessions.login_url(Settings(public_url="https://chat.example.com"), "c") == (
        "https://chat.example.com/login#code=c"
    )
    assert sessions.login_url(Settings(host="::", port=80), "c") == "http://[::1]:80/login#code=c"
    assert sessions.login_url(Settings(host="10.0.0.5", port=9), "c") == (
        "http://10.0.0.5:9/login#code=c"
    )


# --------------------------------------------------------------------------------------------
# The page.


async def test_the_page_is_served_with_its_security_headers(
    api: ApiInstance, client: Client
) -> None:
    for path in ("/", "/login"):
        async with client.http.get(api.url(path)) as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["X-Frame-Options"] == "DENY"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert '<script type="module" src="/static/app.js">' in await response.text()
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY

    assert {"app.js", "api.js", "streams.js", "markdown.js", "style.css"} <= set(STATIC_FILES)
    async with client.http.get(api.url("/static/app.js")) as response:
        assert response.status == 200
        assert response.content_type == "text/javascript"
        etag = response.headers["ETag"]
        assert await response.read() == STATIC_FILES["app.js"].body
    async with client.http.get(
        api.url("/static/app.js"), headers={"If-None-Match": etag}
    ) as response:
        assert response.status == 304
        assert await response.read() == b""

    # Only the package's files: nothing else is reachable under /static.
    for path in ("/static/nope.js", "/static/../app/http/sessions.py", "/static/", "/static"):
        async with client.http.get(api.url(path)) as response:
            assert response.status == 404, path
            assert response.content_type == "application/json"
