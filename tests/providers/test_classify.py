"""Error classification (app/providers/classify.py) on the SDKs' own exception objects, built the
way the SDKs build them from a response. The integration tests cover the same over HTTP."""

from __future__ import annotations

import asyncio
import email.utils
from datetime import timedelta
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from app.providers.base import ClassifiedError, ProviderError
from app.providers.classify import classify, parse_retry_after, provider_cancellation
from tests.fakes import FIXED_NOW, fixed_now

ANTHROPIC_URL = "https://api.anthropic.com/v1/messages"
OPENAI_URL = "https://api.openai.com/v1/chat/completions"


def _response(
    url: str, status: int, body: object, headers: dict[str, str] | None = None
) -> httpx2.Response:
    request = httpx2.Request("POST", url)
    if isinstance(body, str):
        return httpx2.Response(status, text=body, headers=headers, request=request)
    return httpx2.Response(status, json=body, headers=headers, request=request)


def anthropic_error(
    status: int,
    error_type: str | None,
    message: str = "boom",
    *,
    headers: dict[str, str] | None = None,
    error_code: str | None = None,
) -> anthropic.APIStatusError:
    error: dict[str, Any] = {"type": error_type, "message": message}
    if error_code is not None:
        error["details"] = {"error_code": error_code}
    body: object = {"type": "error", "error": error} if error_type is not None else message
    response = _response(ANTHROPIC_URL, status, body, headers)
    return anthropic.APIStatusError(f"Error code: {status}", response=response, body=body)


def openai_error(
    status: int,
    error_type: str | None,
    message: str = "boom",
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> openai.APIStatusError:
    error = {"message": message, "type": error_type, "param": None, "code": code}
    response = _response(OPENAI_URL, status, {"error": error}, headers)
    # The OpenAI client unwraps `error` before building the exception; so do we.
    return openai.APIStatusError(f"Error code: {status}", response=response, body=error)


def kind_of(error: ClassifiedError) -> tuple[str, bool, int | None]:
    return error.kind, error.retryable, error.status_code


@pytest.mark.parametrize(
    ("status", "error_type", "message", "expected"),
    [
        (529, "overloaded_error", "Overloaded", ("overloaded", True, 529)),
        (429, "rate_limit_error", "slow down", ("rate_limit", True, 429)),
        (500, "api_error", "internal", ("generic", True, 500)),
        (503, "api_error", "unavailable", ("generic", True, 503)),
        (504, "timeout_error", "gateway timeout", ("timeout", True, 504)),
        (408, None, "request timeout", ("timeout", True, 408)),
        (401, "authentication_error", "invalid x-api-key", ("auth", False, 401)),
        (403, "permission_error", "not allowed", ("auth", False, 403)),
        (400, "invalid_request_error", "max_tokens too large", ("config", False, 400)),
        (404, "not_found_error", "model: claude-nope", ("config", False, 404)),
        (413, "request_too_large", "too large", ("config", False, 413)),
        (402, "billing_error", "payment required", ("usage_limit", False, 402)),
        # Anthropic reports an empty credit balance as a plain invalid_request_error.
        (
            400,
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API.",
            ("usage_limit", False, 400),
        ),
        # A proxy's HTML page in front of the API: only the status speaks.
        (502, None, "<html>Bad Gateway</html>", ("generic", True, 502)),
    ],
)
def test_anthropic_status_errors(
    status: int, error_type: str | None, message: str, expected: tuple[str, bool, int]
) -> None:
    error = classify(anthropic_error(status, error_type, message), "anthropic", now=fixed_now)
    assert kind_of(error) == expected
    assert error.provider == "anthropic"
    if error_type is not None:
        assert error.message == message  # the API's own words, not the SDK's wrapper text


def test_anthropic_spend_limit_code_on_a_429_is_a_usage_limit() -> None:
    exc = anthropic_error(
        429, "rate_limit_error", "spend limit", error_code="enforced_spend_limit_reached"
    )
    assert kind_of(classify(exc, "anthropic")) == ("usage_limit", False, 429)


@pytest.mark.parametrize(
    ("status", "error_type", "code", "message", "expected"),
    [
        (429, "insufficient_quota", "insufficient_quota", "quota", ("usage_limit", False, 429)),
        (429, "requests", "rate_limit_exceeded", "Rate limit", ("rate_limit", True, 429)),
        # OpenAI answers a bad key with 401 and type invalid_request_error: the status wins.
        (401, "invalid_request_error", "invalid_api_key", "Incorrect", ("auth", False, 401)),
        (403, "invalid_request_error", "unsupported_country", "nope", ("auth", False, 403)),
        (404, "invalid_request_error", "model_not_found", "no model", ("config", False, 404)),
        (400, "invalid_request_error", "context_length_exceeded", "long", ("config", False, 400)),
        (500, "server_error", None, "The server had an error", ("generic", True, 500)),
        (
            503,
            "server_error",
            None,
            "The engine is currently overloaded, please try again later",
            ("overloaded", True, 503),
        ),
    ],
)
def test_openai_status_errors(
    status: int, error_type: str, code: str | None, message: str, expected: tuple[str, bool, int]
) -> None:
    error = classify(openai_error(status, error_type, message, code=code), "openai")
    assert kind_of(error) == expected
    assert error.message == message


def test_anthropic_error_inside_a_200_stream_is_classified_by_its_own_type() -> None:
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    response = _response(ANTHROPIC_URL, 200, "", {"retry-after": "30"})
    exc = anthropic.APIStatusError(str(body), response=response, body=body)

    error = classify(exc, "anthropic")

    # Not "status 200", and the 200's headers are not a Retry-After for this error.
    assert kind_of(error) == ("overloaded", True, None)
    assert error.retry_after_s is None
    assert error.detail is not None and error.detail.startswith("error event in the stream")


@pytest.mark.parametrize(
    ("error_type", "expected"),
    [
        ("api_error", ("generic", True, None)),
        ("invalid_request_error", ("config", False, None)),
        ("something_new", ("generic", True, None)),
    ],
)
def test_anthropic_in_stream_error_types(error_type: str, expected: tuple[str, bool, None]) -> None:
    body = {"type": "error", "error": {"type": error_type, "message": "x"}}
    exc = anthropic.APIStatusError(str(body), response=_response(ANTHROPIC_URL, 200, ""), body=body)
    assert kind_of(classify(exc, "anthropic")) == expected


def test_openai_error_inside_a_200_stream() -> None:
    error_body = {"message": "stream failed", "type": "server_error", "param": None, "code": None}
    exc = openai.APIError("stream failed", httpx2.Request("POST", OPENAI_URL), body=error_body)
    error = classify(exc, "openai")
    assert kind_of(error) == ("generic", True, None)
    assert error.message == "stream failed"


def test_retry_after_header_reaches_the_classified_error() -> None:
    exc = anthropic_error(429, "rate_limit_error", headers={"retry-after": "12"})
    assert classify(exc, "anthropic").retry_after_s == 12.0
    exc_ms = openai_error(429, "requests", headers={"retry-after-ms": "250", "retry-after": "1"})
    assert classify(exc_ms, "openai").retry_after_s == 0.25


@pytest.mark.parametrize(
    ("headers", "expected_s"),
    [
        ({}, None),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # ms is preferred
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),  # unreadable ms: fall back
        (
            {"retry-after": email.utils.format_datetime(FIXED_NOW + timedelta(seconds=42), True)},
            42.0,
        ),
        ({"retry-after": email.utils.format_datetime(FIXED_NOW - timedelta(hours=1), True)}, 0.0),
        ({"retry-after": "-5"}, None),
        ({"retry-after": "tomorrow"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected_s: float | None) -> None:
    assert parse_retry_after(headers, FIXED_NOW) == expected_s


def test_parse_retry_after_reads_httpx_headers_case_insensitively() -> None:
    headers = httpx2.Headers({"Retry-After-Ms": "700"})
    assert parse_retry_after(headers, FIXED_NOW) == 0.7


@pytest.mark.parametrize("sdk", [anthropic, openai])
def test_sdk_timeout_is_a_retryable_timeout(sdk: Any) -> None:
    exc = sdk.APITimeoutError(request=httpx2.Request("POST", ANTHROPIC_URL))
    assert kind_of(classify(exc, "x")) == ("timeout", True, None)


@pytest.mark.parametrize(
    ("cause", "expected_kind"),
    [
        (httpx2.ConnectError("refused"), "generic"),
        (httpx2.RemoteProtocolError("peer closed connection"), "timeout"),
        (httpx2.ReadError("reset by peer"), "timeout"),
        (httpx2.ReadTimeout("read timed out"), "timeout"),
    ],
)
def test_sdk_connection_errors_are_retryable(
    cause: httpx2.TransportError, expected_kind: str
) -> None:
    exc = openai.APIConnectionError(request=httpx2.Request("POST", OPENAI_URL))
    exc.__cause__ = cause
    error = classify(exc, "openai")
    assert (error.kind, error.retryable) == (expected_kind, True)
    assert error.detail is not None and type(cause).__name__ in error.detail


@pytest.mark.parametrize(
    "exc",
    [
        # What Anthropic's stream iterator lets through on a reset mid-body.
        httpx2.RemoteProtocolError("peer closed connection without sending complete body"),
        httpx2.ReadError("connection reset"),
        ConnectionResetError("Connection reset by peer"),
    ],
)
def test_raw_transport_resets_are_retryable_timeouts(exc: Exception) -> None:
    assert kind_of(classify(exc, "anthropic")) == ("timeout", True, None)


def test_provider_error_passes_through_unchanged() -> None:
    original = ClassifiedError(kind="auth", provider="openai", retryable=False, message="no")
    assert classify(ProviderError(original), "openai") is original


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ValueError("unexpected shape"), ("generic", False, None)),  # likely a bug: no retry
        (RuntimeError("upstream overloaded, try later"), ("overloaded", True, None)),
        (RuntimeError("Too Many Requests"), ("rate_limit", True, None)),
        (RuntimeError("You exceeded your current quota"), ("usage_limit", False, None)),
        (RuntimeError("Unauthorized"), ("auth", False, None)),
    ],
)
def test_unstructured_errors_fall_back_to_text(
    exc: Exception, expected: tuple[str, bool, None]
) -> None:
    assert kind_of(classify(exc, "openai")) == expected


def test_detail_is_bounded() -> None:
    error = classify(RuntimeError("x" * 10_000), "openai")
    assert error.detail is not None and len(error.detail) <= 2000


def test_text_does_not_overrule_structure_except_for_billing_and_overload() -> None:
    # A 500 that mentions authorization is still a server failure worth retrying...
    exc = anthropic_error(500, "api_error", "upstream unauthorized while routing")
    assert kind_of(classify(exc, "anthropic")) == ("generic", True, 500)
    # ...and a rejected request that mentions a timeout is still a rejected request.
    exc = anthropic_error(400, "invalid_request_error", "timeout must be positive")
    assert kind_of(classify(exc, "anthropic")) == ("config", False, 400)


def test_a_cancellation_inside_the_provider_is_a_retryable_transport_reset() -> None:
    error = provider_cancellation("openai", asyncio.CancelledError("RST_STREAM"))
    assert (error.kind, error.retryable, error.status_code) == ("timeout", True, None)
    assert error.detail == "CancelledError inside the provider: RST_STREAM"
    bare = provider_cancellation("openai", asyncio.CancelledError())
    assert bare.detail == "CancelledError inside the provider"
