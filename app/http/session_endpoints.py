"""The session routes' handlers (docs/web.md): log a browser in with an API token or a
one-time login code (both set the session cookie), read the current session (the page's way to
learn its CSRF token after a reload), log out. The mechanism itself is in sessions.py."""

from __future__ import annotations

from aiohttp import web

from app.errors import Unauthorized
from app.http import sessions
from app.http.models import CreateSessionRequest, LoginCodeRequest
from app.http.routing import Call, json_response


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
