"""Request input, checked before anything reaches the database: the JSON body (size, syntax,
depth, strings Postgres can store), path and query parameters, then the pydantic model of the
route. Every failure is a `ValidationFailed` (400) with one `{field, detail}` per problem."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from app.errors import ValidationFailed

M = TypeVar("M", bound=BaseModel)

# Deep enough for any real options object; shallow enough that neither Python's json module nor
# Postgres' jsonb parser comes near its recursion limit.
MAX_JSON_DEPTH = 32
MAX_QUERY_VALUE_CHARS = 1000
MAX_DB_INT = 2**63 - 1


class PayloadTooLarge(Exception):
    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"request body larger than {limit_bytes} bytes")
        self.limit_bytes = limit_bytes


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, finite numbers, bounded depth, and only strings that
    PostgreSQL text and jsonb accept (no NUL, no lone surrogates)."""
    if not raw.strip():
        raise ValidationFailed("a JSON body is required")
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError as exc:
        raise ValidationFailed("malformed JSON", detail=f"not UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise ValidationFailed("malformed JSON", detail=detail) from None
    except RecursionError:
        raise ValidationFailed("malformed JSON", detail="nested too deeply") from None
    except ValueError as exc:  # raised by _reject_constant / _finite_float: our own words
        raise ValidationFailed("malformed JSON", detail=str(exc)[:200]) from None
    check_json_value(value)
    return value


def check_json_value(value: Any, path: str = "", depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise ValidationFailed(
            f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
            validations=[{"field": path or "body", "detail": "too deep"}],
        )
    if isinstance(value, str):
        check_text(value, path or "body")
    elif isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_DB_INT:
            raise ValidationFailed(
                "integer out of range",
                validations=[{"field": path or "body", "detail": "beyond 64 bits"}],
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, f"{path}.{key}" if path else key)
            check_json_value(item, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json_value(item, f"{path}[{index}]", depth + 1)


def check_text(text: str, field: str) -> None:
    """Postgres rejects NUL in text and jsonb, and a lone surrogate cannot be encoded."""
    if "\x00" in text:
        raise ValidationFailed(
            "text must not contain NUL characters",
            validations=[{"field": field[:200], "detail": "contains \\u0000"}],
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationFailed(
            "text must be valid Unicode",
            validations=[{"field": field[:200], "detail": "contains a lone surrogate"}],
        ) from None


async def read_body(request: web.Request, model: type[M], *, max_bytes: int) -> M:
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(max_bytes)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(max_bytes) from None
    return validate(model, parse_json(raw))


def validate(model: type[M], value: Any, *, where: str = "") -> M:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise ValidationFailed(
            "invalid request" + (f" {where}" if where else ""),
            validations=[
                {
                    "field": ".".join(str(item) for item in error["loc"]) or where or "body",
                    "detail": error["msg"],
                }
                for error in exc.errors(include_url=False, include_context=False)[:20]
            ],
        ) from None


def read_query(request: web.Request, model: type[M]) -> M:
    """Known query parameters are validated by the model (strings converted by its field types);
    unknown ones are ignored so that cache busters and proxies do no harm. A parameter given
    twice is an error rather than a guess."""
    known = set(model.model_fields)
    values: dict[str, str] = {}
    for name in request.query:
        if name not in known:
            continue
        given = request.query.getall(name)
        if len(given) > 1:
            raise ValidationFailed(
                "query parameter given more than once",
                validations=[{"field": name, "detail": "repeated"}],
            )
        if len(given[0]) > MAX_QUERY_VALUE_CHARS:
            raise ValidationFailed(
                "query parameter too long", validations=[{"field": name, "detail": "too long"}]
            )
        check_text(given[0], name)
        values[name] = given[0]
    return validate(model, values, where="query")


def path_uuid(request: web.Request, name: str) -> uuid.UUID:
    raw = request.match_info.get(name, "")
    invalid = ValidationFailed(
        f"{name} must be a UUID",
        validations=[{"field": name, "detail": "expected a UUID like 8-4-4-4-12 hex digits"}],
    )
    if len(raw) != 36:
        raise invalid
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise invalid from None


def path_id(request: web.Request, name: str) -> int:
    raw = request.match_info.get(name, "")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or not 0 < int(raw) <= MAX_DB_INT:
        raise ValidationFailed(
            f"{name} must be a positive integer",
            validations=[{"field": name, "detail": "expected a positive 64-bit integer"}],
        )
    return int(raw)
