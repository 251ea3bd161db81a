"""The web page and the session routes (docs/web.md).

- `SESSION_ROUTES`: log in with an API token or a one-time login code (both set the session
  cookie), read the current session (the page's way to learn its CSRF token after a reload),
  log out.
- `WEB_ROUTES`: the page itself at `/` and `/login` (one `index.html`; the script decides what
  to show), and each file of app/web/static at `/static/<name>`. The files are read once, at
  import, from inside the package (so an installed wheel serves them too), and each gets a route
  of its own: no path is ever joined from request input, and the OpenAPI document lists them.

The page runs with a strict Content-Security-Policy: scripts and styles only from this origin,
no inline script, no framing, connections only to this origin."""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from typing import Annotated

from aiohttp import web
from pydantic import Field, StrictStr

from app.auth import MAX_TOKEN_CHARS
from app.errors import Unauthorized
from app.http import sessions
from app.http.api import Answer, Call, Handler, Route, json_response
from app.http.models import ErrorBody, Strict

V1 = "/api/v1"

# --------------------------------------------------------------------------------------------
# Sessions.

Secret = Annotated[StrictStr, Field(min_length=1, max_length=MAX_TOKEN_CHARS)]


class CreateSessionRequest(Strict):
    token: Secret = Field(description="An API token (`chatd token create USER`).")


class LoginCodeRequest(Strict):
    code: Secret = Field(description="The code of a one-time login URL (`/login#code=<code>`).")


class SessionUser(Strict):
    id: uuid.UUID
    name: str
    is_admin: bool


class SessionOut(Strict):
    user: SessionUser
    csrf_token: str = Field(
        description="Send it as X-CSRF-Token with every cookie-authenticated request that"
        " changes state (POST, PUT, PATCH, DELETE)."
    )
    expires_at: datetime


async def create_session(call: Call) -> web.StreamResponse:
    sessions.check_origin(call.request, call.settings, required=False)
    body = await call.body(CreateSessionRequest)
    new = await sessions.create_session_from_api_token(
        call.pool, body.token, ttl_s=call.settings.session_ttl_s
    )
    return _logged_in(call, new)


async def create_session_from_login_code(call: Call) -> web.StreamResponse:
    sessions.check_origin(call.request, call.settings, required=False)
    body = await call.body(LoginCodeRequest)
    new = await sessions.create_session_from_login_code(
        call.pool, body.code, ttl_s=call.settings.session_ttl_s
    )
    return _logged_in(call, new)


def _logged_in(call: Call, new: sessions.NewSession) -> web.StreamResponse:
    response = json_response(new.session.to_json(), status=201)
    response.headers["Cache-Control"] = "no-store"
    sessions.set_session_cookie(response, call.request, call.settings, new)
    return response


def _current(call: Call) -> sessions.BrowserSession:
    session: sessions.BrowserSession | None = call.request.get(sessions.SESSION)
    if session is None:
        raise Unauthorized(
            "no browser session",
            detail=f"this route reads the {sessions.COOKIE_NAME} cookie; log in with"
            " POST /api/v1/sessions",
        )
    return session


async def get_current_session(call: Call) -> web.StreamResponse:
    response = json_response(_current(call).to_json())
    response.headers["Cache-Control"] = "no-store"
    return response


async def delete_current_session(call: Call) -> web.StreamResponse:
    await sessions.delete_session(call.pool, _current(call).id)
    response = web.Response(status=204)
    sessions.clear_session_cookie(response, call.request, call.settings)
    return response


E400 = Answer("invalid input (validations lists each problem)", ErrorBody)
E401_LOGIN = Answer("unknown token, or a login code that is unknown, expired or used", ErrorBody)
E401_SESSION = Answer("no valid session cookie", ErrorBody)
E403_ORIGIN = Answer("sent by a page of another origin", ErrorBody)
E413 = Answer("request body too large", ErrorBody)

_COOKIE_NOTE = (
    f" Sets the `{sessions.COOKIE_NAME}` cookie (HttpOnly, SameSite=Strict, Path=/, Secure over"
    " https); see docs/web.md."
)

SESSION_ROUTES: list[Route] = [
    Route(
        "POST",
        f"{V1}/sessions",
        create_session,
        "createSession",
        "Log a browser in with an API token",
        description="The answer carries the CSRF token to send with requests that change state."
        + _COOKIE_NOTE,
        tag="sessions",
        auth=False,
        body=CreateSessionRequest,
        answers={
            201: Answer("logged in", SessionOut),
            400: E400,
            401: E401_LOGIN,
            403: E403_ORIGIN,
            413: E413,
        },
    ),
    Route(
        "POST",
        f"{V1}/sessions/login-code",
        create_session_from_login_code,
        "createSessionFromLoginCode",
        "Log a browser in with a one-time login code",
        description="The code of the URL `chatd serve` prints with the embedded database; each"
        " code works once, for a few minutes." + _COOKIE_NOTE,
        tag="sessions",
        auth=False,
        body=LoginCodeRequest,
        answers={
            201: Answer("logged in", SessionOut),
            400: E400,
            401: E401_LOGIN,
            403: E403_ORIGIN,
            413: E413,
        },
    ),
    Route(
        "GET",
        f"{V1}/sessions/current",
        get_current_session,
        "getCurrentSession",
        "The browser session of the cookie: its user and CSRF token",
        description="401 without a valid session cookie (a bearer token is not a session).",
        tag="sessions",
        answers={200: Answer("the session", SessionOut), 401: E401_SESSION},
    ),
    Route(
        "DELETE",
        f"{V1}/sessions/current",
        delete_current_session,
        "deleteCurrentSession",
        "Log out: the session ends and its cookie is cleared",
        tag="sessions",
        answers={
            204: Answer("logged out"),
            401: E401_SESSION,
            403: Answer("missing or wrong CSRF token", ErrorBody),
        },
    ),
]

# --------------------------------------------------------------------------------------------
# The page and its files.

STATIC_PREFIX = "/static/"
_CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".txt": "text/plain",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
_COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load (cheap: 304 by ETag), so a new release is seen at once.
    "Cache-Control": "no-cache",
}
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class StaticFile:
    name: str
    body: bytes
    content_type: str
    etag: str


def load_static_files() -> dict[str, StaticFile]:
    """Every file of app/web/static whose type the page uses, by name."""
    found: dict[str, StaticFile] = {}
    for entry in (files("app.web") / "static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if not entry.is_file() or suffix not in _CONTENT_TYPES:
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        found[entry.name] = StaticFile(entry.name, body, _CONTENT_TYPES[suffix], etag)
    return dict(sorted(found.items()))


STATIC_FILES = load_static_files()
INDEX = "index.html"


def _serve(static: StaticFile, *, page: bool) -> Handler:
    async def handler(call: Call) -> web.StreamResponse:
        headers = {**_COMMON_HEADERS, "ETag": static.etag, **(_PAGE_HEADERS if page else {})}
        if static.etag in call.request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=static.body, content_type=static.content_type, charset="utf-8", headers=headers
        )

    return handler


def _operation_id(name: str) -> str:
    words = re.split(r"[^A-Za-z0-9]+", name)
    return "static" + "".join(word[:1].upper() + word[1:] for word in words if word)


_NOT_MODIFIED = Answer("not modified (the ETag sent in If-None-Match still matches)")


def _web_routes() -> list[Route]:
    index = STATIC_FILES[INDEX]
    routes = [
        Route(
            "GET",
            path,
            _serve(index, page=True),
            operation_id,
            summary,
            tag="web",
            auth=False,
            answers={200: Answer("the page", None, media_type="text/html"), 304: _NOT_MODIFIED},
        )
        for path, operation_id, summary in (
            ("/", "webPage", "The web page (docs/web.md)"),
            (
                sessions.LOGIN_PATH,
                "webLoginPage",
                "The web page; with `#code=<code>` it logs in with a one-time code",
            ),
        )
    ]
    for name, static in STATIC_FILES.items():
        if name == INDEX:
            continue
        routes.append(
            Route(
                "GET",
                STATIC_PREFIX + name,
                _serve(static, page=False),
                _operation_id(name),
                f"A file of the web page: {name}",
                tag="web",
                auth=False,
                answers={
                    200: Answer(name, None, media_type=static.content_type),
                    304: _NOT_MODIFIED,
                },
            )
        )
    return routes


WEB_ROUTES: list[Route] = _web_routes()
# The routes anyone may open (the page must load before anyone is logged in).
PUBLIC_PATHS = frozenset(route.path for route in [*SESSION_ROUTES, *WEB_ROUTES] if not route.auth)
