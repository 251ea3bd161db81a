"""Browser sessions: how the web page (docs/web.md) authenticates, since a browser's
`EventSource` cannot send a bearer header.

- A session is created from an API token (`POST /api/v1/sessions`) or from a one-time login
  code (what `chatd serve` prints with the embedded database). Its cookie `chatd_session` holds
  an opaque random token; the database keeps only its SHA-256, like API tokens. The cookie is
  HttpOnly (page scripts never see it), SameSite=Strict (no other site's page can make the
  browser send it), Path=/, and Secure when the request came over https or the public URL is
  https.
- Every route a bearer token opens, the cookie opens too (`authenticate_request`, called by
  the route machinery). A bearer header wins when both are present, so API clients behave
  exactly as before.
- CSRF: a request authenticated by the cookie with a method that changes state must carry the
  session's synchronizer token in `X-CSRF-Token` (compared in constant time). The page reads the
  token from the session's JSON answer; another site can neither read it nor, with
  SameSite=Strict, make the browser send the cookie. A cookie-authenticated WebSocket upgrade
  must come from this origin (its `Origin` header), against cross-site WebSocket hijacking.
- One-time login codes are random, stored hashed, expire quickly and are spent by the first
  request that presents one (checked and marked in one statement).

This module knows nothing of the route table (app/http/api.py calls it, not the other way)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import asyncpg
from aiohttp import web

from app.config import Settings
from app.db.queries import Conn, project_queries, transaction
from app.errors import Forbidden, Unauthorized
from app.http import keys
from app.http.auth import MAX_TOKEN_CHARS, User, authenticate, bearer_token

Q = project_queries()

COOKIE_NAME = "chatd_session"
CSRF_HEADER = "X-CSRF-Token"
# Methods that change state: a cookie-authenticated request with one of them needs the CSRF
# token. GET and HEAD never change anything in chatd (streams and the watch are GETs).
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOGIN_PATH = "/login"


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _plausible_secret(value: str) -> bool:
    """What a token, code or cookie value we issued can look like; anything else is refused
    before it is hashed or sent to the database."""
    return 0 < len(value) <= MAX_TOKEN_CHARS and value.isascii() and value.isprintable()


@dataclass(frozen=True)
class BrowserSession:
    id: uuid.UUID
    user: User
    csrf_token: str
    expires_at: datetime

    def to_json(self) -> dict[str, object]:
        """The body of the session routes: who is logged in, the CSRF token to echo, and when
        the session ends."""
        return {
            "user": {
                "id": str(self.user.id),
                "name": self.user.name,
                "is_admin": self.user.is_admin,
            },
            "csrf_token": self.csrf_token,
            "expires_at": self.expires_at.isoformat(),
        }


@dataclass(frozen=True)
class NewSession:
    session: BrowserSession
    cookie_value: str  # the opaque token; it exists in clear only in this answer's cookie


# The session that authenticated this request, when the cookie did (not a bearer token).
SESSION = web.RequestKey("chatd_browser_session", BrowserSession)


def _user(row: asyncpg.Record) -> User:
    return User(
        id=row["id"],
        organization_id=row["organization_id"],
        name=row["name"],
        is_admin=row["is_admin"],
    )


async def _insert_session(conn: Conn, user: User, ttl_s: float) -> NewSession:
    token = secrets.token_urlsafe(32)
    csrf_token = secrets.token_urlsafe(32)
    await conn.execute(Q.sql("sessions_delete_expired"))
    row = await conn.fetchrow(Q.sql("sessions_insert"), user.id, _hash(token), csrf_token, ttl_s)
    assert row is not None
    return NewSession(BrowserSession(row["id"], user, csrf_token, row["expires_at"]), token)


async def create_session(pool: asyncpg.Pool, user: User, *, ttl_s: float) -> NewSession:
    async with transaction(pool) as conn:
        return await _insert_session(conn, user, ttl_s)


async def create_session_from_api_token(
    pool: asyncpg.Pool, token: str, *, ttl_s: float
) -> NewSession:
    """Log in with an API token (the page's login form). Unauthorized for an unknown one."""
    if not _plausible_secret(token.strip()):
        raise Unauthorized("invalid token")
    user = await authenticate(pool, token.strip())
    return await create_session(pool, user, ttl_s=ttl_s)


async def create_session_from_login_code(
    pool: asyncpg.Pool, code: str, *, ttl_s: float
) -> NewSession:
    """Spend a one-time login code and open a session for its user, in one transaction (a
    failure leaves the code unspent). Unknown, expired and used codes are all one 401."""
    if not _plausible_secret(code):
        raise Unauthorized("invalid login code")
    async with transaction(pool) as conn:
        row = await conn.fetchrow(Q.sql("sessions_spend_login_code"), _hash(code))
        if row is None:
            raise Unauthorized(
                "this login link has expired or was already used",
                detail="log in with an API token, or restart `chatd serve` for a new link",
            )
        return await _insert_session(conn, _user(row), ttl_s)


async def session_by_cookie(pool: asyncpg.Pool, value: str) -> BrowserSession | None:
    if not _plausible_secret(value):
        return None
    row = await pool.fetchrow(Q.sql("sessions_user_by_token_hash"), _hash(value))
    if row is None:
        return None
    return BrowserSession(row["session_id"], _user(row), row["csrf_token"], row["expires_at"])


async def delete_session(pool: asyncpg.Pool, session_id: uuid.UUID) -> None:
    await pool.execute(Q.sql("sessions_delete"), session_id)


async def create_login_code(pool: asyncpg.Pool, user_id: uuid.UUID, *, ttl_s: float) -> str:
    """A new one-time login code for the user, returned once (only its hash is stored)."""
    code = secrets.token_urlsafe(24)
    async with transaction(pool) as conn:
        await conn.execute(Q.sql("sessions_delete_expired"))
        await conn.fetchrow(Q.sql("sessions_insert_login_code"), user_id, _hash(code), ttl_s)
    return code


def base_url(settings: Settings) -> str:
    """Where users reach this replica: the public URL when set, else the bind address (a
    wildcard bind is reached on the loopback address)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = settings.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def login_url(settings: Settings, code: str) -> str:
    """The one-time login URL. The code travels in the fragment, which browsers never send to a
    server: it stays out of access logs, proxies and Referer headers; the page posts it."""
    return f"{base_url(settings)}{LOGIN_PATH}#code={code}"


async def local_login_url(pool: asyncpg.Pool, settings: Settings, local_token: str) -> str:
    """`chatd serve` with the embedded database: a one-click login URL for the local user."""
    user = await authenticate(pool, local_token)
    code = await create_login_code(pool, user.id, ttl_s=settings.login_code_ttl_s)
    return login_url(settings, code)


# --------------------------------------------------------------------------------------------
# Cookies and request checks.


def cookie_secure(request: web.Request, settings: Settings) -> bool:
    return request.secure or settings.public_url.lower().startswith("https://")


def set_session_cookie(
    response: web.StreamResponse, request: web.Request, settings: Settings, new: NewSession
) -> None:
    response.set_cookie(
        COOKIE_NAME,
        new.cookie_value,
        max_age=max(1, int(settings.session_ttl_s)),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=cookie_secure(request, settings),
    )


def clear_session_cookie(
    response: web.StreamResponse, request: web.Request, settings: Settings
) -> None:
    response.del_cookie(
        COOKIE_NAME,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=cookie_secure(request, settings),
    )


def same_origin(request: web.Request, settings: Settings) -> bool:
    """The request's `Origin` names this service: its Host (what the browser connected to), or
    the public URL's origin (behind a proxy that rewrites Host). An absent Origin is not
    same-origin; "null" (sandboxed frames, some redirects) never is."""
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return False
    netloc = urlsplit(origin).netloc.lower()
    if netloc and netloc == request.host.lower():
        return True
    if settings.public_url:
        public = urlsplit(settings.public_url)
        return origin.lower() == f"{public.scheme}://{public.netloc}".lower()
    return False


def check_origin(request: web.Request, settings: Settings, *, required: bool) -> None:
    """Refuse a request that a page of another origin sent. Browsers send `Origin` on every
    POST, PUT, PATCH, DELETE and WebSocket handshake; clients that are not browsers usually send
    none, so it is only required where only a browser can be (a cookie-authenticated
    WebSocket)."""
    if "Origin" not in request.headers and not required:
        return
    if not same_origin(request, settings):
        raise Forbidden(
            "cross-origin request refused",
            detail="the Origin header does not name this service",
        )


def _is_websocket_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


async def authenticate_request(request: web.Request) -> User:
    """The user of a request to a route that needs one. A bearer header wins (and behaves as it
    always did); otherwise the session cookie, with the CSRF token required on methods that
    change state and a same-origin check on WebSocket upgrades. Neither: 401."""
    pool = request.app[keys.POOL]
    authorization = request.headers.get("Authorization")
    cookie = request.cookies.get(COOKIE_NAME)
    if authorization or not cookie:
        return await authenticate(pool, bearer_token(authorization))
    session = await session_by_cookie(pool, cookie)
    if session is None:
        raise Unauthorized(
            "the browser session has expired or was logged out",
            detail="log in again: POST /api/v1/sessions",
        )
    settings = request.app[keys.SETTINGS]
    if request.method in UNSAFE_METHODS:
        check_origin(request, settings, required=False)
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode("utf-8", "replace"), session.csrf_token.encode()):
            raise Forbidden(
                "missing or wrong CSRF token",
                detail=f"a request authenticated by the session cookie that changes state"
                f" sends the session's csrf_token in the {CSRF_HEADER} header",
            )
    if _is_websocket_upgrade(request):
        check_origin(request, settings, required=True)
    request[SESSION] = session
    return session.user
