"""Turn whatever a provider call raised into a `ClassifiedError` (docs/providers.md,
"Classification").

Order of evidence, strongest first:
1. structured SDK errors: HTTP status, `retry-after-ms`/`retry-after` headers, and the error
   `type`/`code` of the JSON body (an error event inside a 200 stream has only the latter, so it
   is classified by its own type and never as "status 200");
2. transport failures (timeouts, resets, refused connections), from the SDK or raw httpx2;
3. text heuristics on the message, last, for errors that carry no structure, and to recognise
   billing problems that providers report as plain 400/403s.

`asyncio.CancelledError` is not an `Exception`, so it can never be passed to `classify`: a
caller's cancel propagates untouched. Only the retry loop, which can tell a CancelledError that
arose inside the provider from its caller's cancel (by `Task.cancelling()`), turns the former
into an error, with `provider_cancellation`.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import anthropic
import httpx2
import openai

from app.providers.base import ClassifiedError, ErrorKind, ProviderError

# Error codes and types that mean "your account cannot pay for this": retrying cannot help.
USAGE_LIMIT_CODES = frozenset(
    {
        "billing_error",  # Anthropic error type
        "insufficient_quota",  # OpenAI type and code on a 429
        "billing_hard_limit_reached",
        "billing_not_active",
        "contract_spend_limit_reached",  # Anthropic error codes on a 429
        "enforced_spend_limit_reached",
        "linked_organization_spend_limit_reached",
        "linked_organization_billing_unavailable",
    }
)

# The error `type` of a body (Anthropic's, and OpenAI's where it differs) when the status does
# not settle the kind by itself: in-stream errors, 5xx bodies that say "overloaded", 4xx details.
TYPE_KINDS: dict[str, tuple[ErrorKind, bool]] = {
    "overloaded_error": ("overloaded", True),
    "rate_limit_error": ("rate_limit", True),
    "api_error": ("generic", True),
    "server_error": ("generic", True),
    "timeout_error": ("timeout", True),
    "authentication_error": ("auth", False),
    "permission_error": ("auth", False),
    "invalid_request_error": ("config", False),
    "not_found_error": ("config", False),
    "request_too_large": ("config", False),
}

_KIND_MESSAGES: dict[ErrorKind, str] = {
    "overloaded": "the provider is overloaded",
    "rate_limit": "the provider's rate limit was reached",
    "timeout": "the provider's stream stopped before the step finished",
    "startup_timeout": "the provider did not start answering in time",
    "auth": "the provider rejected the credentials",
    "config": "the provider rejected the request",
    "usage_limit": "the provider account's quota or billing limit was reached",
    "generic": "the provider failed",
}

# Heuristics, checked in order: for errors without structure, and (some of them) to
# refine what the structure left generic; see `_from_api_error`.
_TEXT_RULES: tuple[tuple[tuple[str, ...], ErrorKind, bool], ...] = (
    (
        ("credit balance", "insufficient_quota", "exceeded your current quota", "billing"),
        "usage_limit",
        False,
    ),
    (("overloaded",), "overloaded", True),
    (("rate limit", "too many requests"), "rate_limit", True),
    (("invalid api key", "invalid x-api-key", "incorrect api key", "unauthorized"), "auth", False),
    (("timed out", "timeout"), "timeout", True),
    (
        ("connection reset", "connection refused", "broken pipe", "server disconnected"),
        "generic",
        True,
    ),
)

MAX_DETAIL_CHARS = 2000


def utc_now() -> datetime:
    return datetime.now(UTC)


def classify(  # noqa: PLR0911  one return per exception family
    exc: Exception, provider: str, *, now: Callable[[], datetime] = utc_now
) -> ClassifiedError:
    """Classify `exc`, raised while `provider` streamed a step. `now` dates a Retry-After."""
    if isinstance(exc, ProviderError):
        return exc.error
    if isinstance(exc, anthropic.APIStatusError):
        return _from_api_error(
            provider,
            status=exc.status_code,
            headers=exc.response.headers,
            body=exc.body,
            error_type=exc.type,
            error_code=exc.error_code,
            exc=exc,
            now=now,
        )
    if isinstance(exc, openai.APIStatusError):
        return _from_api_error(
            provider,
            status=exc.status_code,
            headers=exc.response.headers,
            body=exc.body,
            error_type=exc.type,
            error_code=exc.code,
            exc=exc,
            now=now,
        )
    if isinstance(exc, anthropic.APIConnectionError | openai.APIConnectionError):
        # The SDKs wrap the transport error; its cause says whether we ever got connected.
        return _from_transport(provider, exc.__cause__ or exc, fallback=exc)
    if isinstance(exc, openai.APIError):
        # OpenAI raises a status-less APIError for `{"error": ...}` inside a 200 stream.
        return _from_api_error(
            provider,
            status=None,
            headers={},
            body=exc.body,
            error_type=exc.type,
            error_code=exc.code,
            exc=exc,
            now=now,
        )
    if isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError):
        # Anthropic's stream iterator lets raw httpx2 errors through on a reset mid-body.
        return _from_transport(provider, exc, fallback=exc)
    return _from_text(provider, exc)


def provider_cancellation(provider: str, exc: BaseException) -> ClassifiedError:
    """A CancelledError that arose inside the SDK or its transport while nobody cancelled the
    step (an HTTP/2 RST_STREAM, a cancelled anyio scope in httpx): the stream was reset under
    us, which is a retryable transport failure like a connection lost mid-stream."""
    text = str(exc)
    return ClassifiedError(
        kind="timeout",
        provider=provider,
        retryable=True,
        message="the provider's stream was cancelled by its transport mid-stream",
        detail=_truncate(
            f"{type(exc).__name__} inside the provider" + (f": {text}" if text else "")
        ),
    )


def parse_retry_after(headers: Mapping[str, str], now: datetime) -> float | None:
    """Seconds to wait before retrying, from `retry-after-ms` (preferred: it is more precise)
    or `retry-after` (delta-seconds or an HTTP date). None if absent or unreadable."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        seconds = _non_negative_float(raw_ms)
        if seconds is not None:
            return seconds / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    seconds = _non_negative_float(raw)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive parse means it said so
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _non_negative_float(raw: str) -> float | None:
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _from_api_error(
    provider: str,
    *,
    status: int | None,
    headers: Mapping[str, str],
    body: object,
    error_type: str | None,
    error_code: str | None,
    exc: Exception,
    now: Callable[[], datetime],
) -> ClassifiedError:
    error_body = _error_object(body)
    error_type = error_type or _str_field(error_body, "type")
    error_code = error_code or _str_field(error_body, "code")
    api_message = _str_field(error_body, "message")
    # A 200 means the error arrived as an event inside the stream: the HTTP status says nothing.
    http_status = status if status is not None and status >= 400 else None

    kind, retryable = _kind_for(http_status, error_type, error_code)
    # The structure outranks the text, with two exceptions it cannot express: Anthropic reports
    # an empty credit balance as a plain 400 invalid_request_error, and OpenAI an overload as a
    # plain 503 server_error.
    if kind == "config":
        kind, retryable = _refine_by_text(
            api_message or str(exc), kind, retryable, only={"usage_limit"}
        )
    elif kind == "generic":
        kind, retryable = _refine_by_text(
            api_message or str(exc), kind, retryable, only={"usage_limit", "overloaded"}
        )

    retry_after_s = parse_retry_after(headers, now()) if http_status is not None else None
    where = f"HTTP {http_status}" if http_status is not None else "error event in the stream"
    label = error_code or error_type or "no error type"
    return ClassifiedError(
        kind=kind,
        provider=provider,
        retryable=retryable,
        message=api_message or _KIND_MESSAGES[kind],
        status_code=http_status,
        retry_after_s=retry_after_s,
        detail=f"{where}, {label}: {_truncate(str(exc))}",
    )


def _kind_for(  # noqa: PLR0911  a decision table, one row per return
    status: int | None, error_type: str | None, error_code: str | None
) -> tuple[ErrorKind, bool]:
    if error_code in USAGE_LIMIT_CODES or error_type in USAGE_LIMIT_CODES or status == 402:
        return "usage_limit", False
    # OpenAI answers a bad key with 401 + type "invalid_request_error": the status decides.
    if status in (401, 403):
        return "auth", False
    if status == 429:
        return "rate_limit", True
    if status == 529:
        return "overloaded", True
    if error_type in TYPE_KINDS:
        return TYPE_KINDS[error_type]
    if status in (408, 504):
        return "timeout", True
    if status is None or status == 409 or status >= 500:
        # Unknown in-stream errors and server-side failures: the next attempt may well work.
        return "generic", True
    return "config", False  # any other 4xx: the request itself is wrong (model, size, schema)


def _refine_by_text(
    text: str, kind: ErrorKind, retryable: bool, *, only: Collection[ErrorKind] | None = None
) -> tuple[ErrorKind, bool]:
    """The first text rule that matches `text` (limited to the kinds in `only`), else the
    given classification."""
    lowered = text.lower()
    for needles, rule_kind, rule_retryable in _TEXT_RULES:
        if only is not None and rule_kind not in only:
            continue
        if any(needle in lowered for needle in needles):
            return rule_kind, rule_retryable
    return kind, retryable


def _from_transport(provider: str, cause: BaseException, *, fallback: Exception) -> ClassifiedError:
    if isinstance(cause, httpx2.TimeoutException | TimeoutError) or isinstance(
        fallback, anthropic.APITimeoutError | openai.APITimeoutError
    ):
        kind: ErrorKind = "timeout"
        message = "the request to the provider timed out"
    elif isinstance(cause, httpx2.ConnectError | ConnectionRefusedError):
        kind = "generic"
        message = "could not connect to the provider"
    else:
        # Reset or closed mid-body: the stream ended before its terminal event, a retryable
        # timeout (docs/providers.md, "Classification").
        kind = "timeout"
        message = "the connection to the provider was lost mid-stream"
    return ClassifiedError(
        kind=kind,
        provider=provider,
        retryable=True,
        message=message,
        detail=_truncate(f"{type(cause).__name__}: {cause}"),
    )


def _from_text(provider: str, exc: Exception) -> ClassifiedError:
    text = str(exc)
    # An exception we know nothing about is most likely a bug: retrying it 25 times would only
    # hide it, so it is not retryable unless its text names a transient condition.
    kind, retryable = _refine_by_text(text, "generic", False)
    return ClassifiedError(
        kind=kind,
        provider=provider,
        retryable=retryable,
        message=_KIND_MESSAGES[kind],
        detail=_truncate(f"{type(exc).__name__}: {text}"),
    )


def _error_object(body: object) -> Mapping[str, Any]:
    """The error object of a body: `{"error": {...}}` (Anthropic, OpenAI HTTP bodies) or the
    object itself (OpenAI's SDK unwraps it already)."""
    if not isinstance(body, Mapping):
        return {}
    inner = body.get("error")
    return inner if isinstance(inner, Mapping) else body


def _str_field(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"
