"""The ONE place where errors become HTTP answers: a JSON body `{message, detail?, validations?}`
with the status of the error's class. Handlers never choose an error status themselves.

| error | status |
|---|---|
| ValidationFailed, malformed JSON | 400 |
| Unauthorized | 401 |
| Forbidden | 403 |
| NotFound, unknown route | 404 |
| wrong method | 405 |
| InvalidTransition, Conflict | 409 |
| SpendLimitReached | 409, with its own body |
| body over `max_body_bytes` | 413 |
| QueueFull | 429 |
| LimitReached (a per-user limit; the body names it) | 429 |
| database unreachable or overloaded | 503 |

Anything else is a bug: it is logged with its traceback and answered 500 with a generic body
(the fuzz tests exist to make sure no input gets there)."""

from __future__ import annotations

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler

from app.db.failures import DbFailure, classify_db_error
from app.errors import (
    ChatdError,
    Conflict,
    Forbidden,
    InvalidTransition,
    LimitReached,
    NotFound,
    QueueFull,
    SpendLimitReached,
    Unauthorized,
    ValidationFailed,
)
from app.http.routing import json_response
from app.http.validation import PayloadTooLarge
from app.log import get_logger

log = get_logger(__name__)

_STATUS: list[tuple[type[ChatdError], int]] = [
    (ValidationFailed, 400),
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (InvalidTransition, 409),
    (Conflict, 409),
    (SpendLimitReached, 409),
    (QueueFull, 429),
    (LimitReached, 429),
]

_HTTP_MESSAGES = {
    404: "no such route",
    405: "method not allowed on this route",
    413: "request body too large",
}


def status_of(error: ChatdError) -> int:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500


def error_body(error: ChatdError) -> dict[str, object]:
    if isinstance(error, SpendLimitReached | LimitReached):
        return error.body()
    body: dict[str, object] = {"message": error.message}
    if error.detail:
        body["detail"] = error.detail
    if isinstance(error, ValidationFailed) and error.validations:
        body["validations"] = error.validations
    if isinstance(error, QueueFull):
        body["detail"] = f"at most {error.limit} queued messages per chat"
    return body


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:  # noqa: PLR0911, PLR0912  one answer per kind of failure
    try:
        return await handler(request)
    except ChatdError as error:
        status = status_of(error)
        if status == 500:
            log.error("http.unmapped_error", path=request.path, error=repr(error), exc_info=True)
            return json_response({"message": "internal error"}, status=500)
        response = json_response(error_body(error), status=status)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="chatd"'
        return response
    except PayloadTooLarge as error:
        return json_response(
            {"message": "request body too large", "detail": f"limit {error.limit_bytes} bytes"},
            status=413,
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body: dict[str, object] = {"message": _HTTP_MESSAGES.get(exc.status, exc.reason)}
        if exc.status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
            body["detail"] = "allowed: " + ", ".join(sorted(exc.allowed_methods))
        response = json_response(body, status=exc.status)
        for name in ("Allow",):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except (
        asyncpg.exceptions.DataError,
        asyncpg.exceptions.IntegrityConstraintViolationError,
    ) as exc:
        # Input validation should have caught this; the database is the last line, and what it
        # refused is still the caller's input, not a server fault.
        log.warning("http.rejected_by_database", path=request.path, error=repr(exc))
        return json_response(
            {
                "message": "the database rejected the request",
                "detail": "a value is out of range or breaks a constraint",
            },
            status=400,
        )
    except ConnectionResetError:
        raise  # the client went away: nobody to answer
    except Exception as exc:
        failure = classify_db_error(exc)
        if failure in (DbFailure.OUTAGE, DbFailure.CONTENTION):
            # The database is restarting, unreachable, overloaded or the request lost a race:
            # the client may simply try again.
            log.warning(
                "http.database_unavailable",
                path=request.path,
                failure=failure.value,
                error=repr(exc),
            )
            return _unavailable()
        log.error("http.internal_error", path=request.path, error=repr(exc), exc_info=True)
        return json_response({"message": "internal error"}, status=500)


def _unavailable() -> web.Response:
    # What failed is in the log; the body says only what to do.
    response = json_response(
        {"message": "service temporarily unavailable", "detail": "retry shortly"},
        status=503,
    )
    response.headers["Retry-After"] = "1"
    return response
