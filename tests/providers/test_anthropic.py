"""The Anthropic adapter through the real SDK, over real HTTP, against the fake Messages API:
a tool conversation, what the SDK sent, and every scripted fault through the retry loop."""

from __future__ import annotations

import asyncio
import email.utils
import socket
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta

import pytest

from app.providers.anthropic import AnthropicProvider
from app.providers.base import (
    ModelConfig,
    ModelRequest,
    PromptMessage,
    ReasoningDelta,
    StepFinished,
    TextDelta,
    ToolCall,
    ToolSpec,
    Usage,
)
from app.providers.catalog import close_providers, provider_for
from app.providers.retry import stream_step
from tests.conditions import wait_for
from tests.fakes import (
    FIXED_NOW,
    PARTIAL,
    Behaviour,
    DropMidBody,
    EndEarly,
    HttpError,
    SilenceMidStream,
    SlowStart,
    Step,
    StreamError,
    ToolUse,
    fixed_now,
    run_step,
    running,
)
from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.transport import CancelMidStream

API_KEY = "sk-ant-test-key"
CONFIG = ModelConfig(id="claude", provider="anthropic", model="claude-test-model")
READ_FILE = ToolSpec(
    name="read_file",
    description="Read a file of the workspace.",
    input_schema={"type": "object", "properties": {"path": {"type": "string"}}},
)
USER = PromptMessage("user", [{"type": "text", "text": "What does notes.txt say?"}])


def question(*messages: PromptMessage, config: ModelConfig = CONFIG) -> ModelRequest:
    return ModelRequest(
        config=config,
        messages=[USER, *messages],
        system="You are a careful assistant.",
        tools=[READ_FILE],
        max_output_tokens=1024,
    )


def api_key_sent(headers: Mapping[str, str]) -> str | None:
    """The key the SDK authenticated with: `x-api-key` in older SDKs, a bearer token in newer."""
    if "x-api-key" in headers:
        return headers["x-api-key"]
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token if scheme == "Bearer" else None


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropicServer]:
    async with running(FakeAnthropicServer()) as server:
        yield server


@pytest.fixture
async def provider(fake: FakeAnthropicServer) -> AsyncIterator[AnthropicProvider]:
    adapter = AnthropicProvider(api_key=API_KEY, base_url=fake.base_url, now=fixed_now)
    try:
        yield adapter
    finally:
        await adapter.aclose()


async def test_tool_conversation(fake: FakeAnthropicServer, provider: AnthropicProvider) -> None:
    fake.script(
        Step(
            reasoning="I should read the file",
            text="Let me read it.",
            tool_calls=(ToolUse("toolu_01", "read_file", {"path": "notes.txt"}),),
            input_tokens=120,
            output_tokens=30,
            cache_write_tokens=900,
        ),
        Step(text="It says hello.", input_tokens=15, output_tokens=6, cache_read_tokens=900),
    )

    first = await run_step(provider, question())

    assert first.error is None and first.retries == []
    assert first.log == [
        ReasoningDelta("I"),
        ReasoningDelta(" should"),
        ReasoningDelta(" read"),
        ReasoningDelta(" the"),
        ReasoningDelta(" file"),
        ReasoningDelta("", signature="sig-22"),
        TextDelta("Let"),
        TextDelta(" me"),
        TextDelta(" read"),
        TextDelta(" it."),
        ToolCall("toolu_01", "read_file", {"path": "notes.txt"}),
        StepFinished("tool_use", Usage(120, 30, cache_read_tokens=0, cache_write_tokens=900)),
    ]

    # The chat loop persists the step and runs the tool; the next prompt carries both.
    assistant = PromptMessage(
        "assistant",
        [
            {"type": "reasoning", "text": "I should read the file", "signature": "sig-22"},
            {"type": "text", "text": "Let me read it."},
            {
                "type": "tool_call",
                "id": "toolu_01",
                "name": "read_file",
                "args": {"path": "notes.txt"},
            },
        ],
    )
    results = PromptMessage(
        "tool",
        [
            {
                "type": "tool_result",
                "tool_call_id": "toolu_01",
                "name": "read_file",
                "result": {"content": "hello"},
                "is_error": False,
            }
        ],
    )
    second = await run_step(provider, question(assistant, results))

    assert second.log == [
        TextDelta("It"),
        TextDelta(" says"),
        TextDelta(" hello."),
        StepFinished("end_turn", Usage(15, 6, cache_read_tokens=900, cache_write_tokens=0)),
    ]

    sent = fake.requests[1]
    assert sent.path == "/v1/messages"
    assert api_key_sent(sent.headers) == API_KEY
    assert sent.body["model"] == "claude-test-model"
    assert sent.body["max_tokens"] == 1024
    assert sent.body["stream"] is True
    # One cache breakpoint at the end of the static prefix (tools come before system)...
    assert sent.body["system"] == [
        {
            "type": "text",
            "text": "You are a careful assistant.",
            "cache_control": {"type": "ephemeral"},
        }
    ]
    assert sent.body["tools"] == [
        {
            "name": "read_file",
            "description": "Read a file of the workspace.",
            "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
        }
    ]
    # ...and one on the last block of the last message; tool results go in a user turn.
    assert sent.body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "What does notes.txt say?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should read the file", "signature": "sig-22"},
                {"type": "text", "text": "Let me read it."},
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "read_file",
                    "input": {"path": "notes.txt"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01",
                    "content": '{"content": "hello"}',
                    "is_error": False,
                    "cache_control": {"type": "ephemeral"},
                }
            ],
        },
    ]


async def test_failed_tool_and_a_queued_user_message_share_one_user_turn(
    fake: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    fake.script(Step(text="Sorry."))
    assistant = PromptMessage(
        "assistant",
        [
            # Reasoning without a signature cannot be replayed to Anthropic: it is dropped.
            {"type": "reasoning", "text": "unsigned"},
            {"type": "tool_call", "id": "toolu_9", "name": "read_file", "args": {"path": "x"}},
        ],
    )
    results = PromptMessage(
        "tool",
        [
            {
                "type": "tool_result",
                "tool_call_id": "toolu_9",
                "name": "read_file",
                "result": "no such file",
                "is_error": True,
            }
        ],
    )
    follow_up = PromptMessage("user", [{"type": "text", "text": "Never mind."}])

    await run_step(provider, question(assistant, results, follow_up))

    messages = fake.requests[0].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == [
        {"type": "tool_use", "id": "toolu_9", "name": "read_file", "input": {"path": "x"}}
    ]
    assert messages[2]["content"] == [
        {
            "type": "tool_result",
            "tool_use_id": "toolu_9",
            "content": "no such file",
            "is_error": True,
        },
        {"type": "text", "text": "Never mind.", "cache_control": {"type": "ephemeral"}},
    ]


async def test_without_system_prompt_the_last_tool_carries_the_cache_mark(
    fake: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    fake.script(Step(text="ok"))
    await run_step(provider, ModelRequest(config=CONFIG, messages=[USER], tools=[READ_FILE]))
    body = fake.requests[0].body
    assert "system" not in body
    assert body["tools"][-1]["cache_control"] == {"type": "ephemeral"}


async def test_thinking_is_sent_when_the_model_config_asks_for_it(
    fake: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    fake.script(Step(text="ok"))
    config = ModelConfig(
        id="c",
        provider="anthropic",
        model="claude-test-model",
        options={"thinking_budget_tokens": 2048},
    )
    await run_step(provider, question(config=config))
    assert fake.requests[0].body["thinking"] == {"type": "enabled", "budget_tokens": 2048}


RETRY_AT_DATE = email.utils.format_datetime(FIXED_NOW + timedelta(seconds=30), usegmt=True)


@pytest.mark.parametrize(
    ("fault", "kind", "status_code", "delay_ms"),
    [
        pytest.param(
            HttpError(429, "rate_limit_error", headers={"retry-after": "7"}),
            "rate_limit",
            429,
            7000,
            id="429-retry-after-seconds",
        ),
        pytest.param(
            HttpError(
                429, "rate_limit_error", headers={"retry-after-ms": "1500", "retry-after": "9"}
            ),
            "rate_limit",
            429,
            1500,
            id="429-retry-after-ms-wins",
        ),
        pytest.param(
            HttpError(429, "rate_limit_error", headers={"retry-after": RETRY_AT_DATE}),
            "rate_limit",
            429,
            30_000,
            id="429-retry-after-http-date",
        ),
        # A Retry-After shorter than the backoff does not shorten it.
        pytest.param(
            HttpError(429, "rate_limit_error", headers={"retry-after": "0.2"}),
            "rate_limit",
            429,
            1000,
            id="429-short-retry-after",
        ),
        pytest.param(
            HttpError(529, "overloaded_error", "Overloaded"), "overloaded", 529, 1000, id="529"
        ),
        pytest.param(
            HttpError(500, "api_error", "Internal server error"), "generic", 500, 1000, id="500"
        ),
        pytest.param(HttpError(502, None, "Bad Gateway"), "generic", 502, 1000, id="502-html"),
        pytest.param(
            HttpError(503, "api_error", "Service unavailable"), "generic", 503, 1000, id="503"
        ),
        pytest.param(
            StreamError("overloaded_error", "Overloaded"),
            "overloaded",
            None,
            1000,
            id="in-stream-overloaded",
        ),
        pytest.param(
            StreamError("api_error", "Internal server error"),
            "generic",
            None,
            1000,
            id="in-stream-api-error",
        ),
        pytest.param(DropMidBody(), "timeout", None, 1000, id="connection-dropped-mid-body"),
        pytest.param(EndEarly(), "timeout", None, 1000, id="ends-before-message-stop"),
    ],
)
async def test_retryable_faults_are_retried_then_succeed(
    fake: FakeAnthropicServer,
    provider: AnthropicProvider,
    *,
    fault: Behaviour,
    kind: str,
    status_code: int | None,
    delay_ms: int,
) -> None:
    fake.script(fault, Step(text="recovered"))

    run = await run_step(provider, question())

    assert run.error is None
    assert [
        (r.attempt, r.error.kind, r.error.retryable, r.error.status_code) for r in run.retries
    ] == [(1, kind, True, status_code)]
    assert run.retries[0].error.provider == "anthropic"
    assert run.retries[0].delay_ms == delay_ms
    assert run.retries[0].retrying_at == FIXED_NOW + timedelta(milliseconds=delay_ms)
    assert run.text == "recovered"
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("fault", "kind", "status_code"),
    [
        pytest.param(
            HttpError(401, "authentication_error", "invalid x-api-key"), "auth", 401, id="401"
        ),
        pytest.param(
            HttpError(403, "permission_error", "no access to this model"), "auth", 403, id="403"
        ),
        pytest.param(
            HttpError(400, "invalid_request_error", "max_tokens: too large"),
            "config",
            400,
            id="400-invalid-request",
        ),
        pytest.param(
            HttpError(404, "not_found_error", "model: claude-test-model"),
            "config",
            404,
            id="404-unknown-model",
        ),
        pytest.param(
            HttpError(
                400, "invalid_request_error", "Your credit balance is too low to use the API."
            ),
            "usage_limit",
            400,
            id="400-credit-balance",
        ),
    ],
)
async def test_non_retryable_faults_fail_at_once(
    fake: FakeAnthropicServer,
    provider: AnthropicProvider,
    *,
    fault: HttpError,
    kind: str,
    status_code: int,
) -> None:
    fake.script(fault, Step(text="never sent"))

    run = await run_step(provider, question())

    assert run.retries == []
    assert run.error is not None
    error = run.error.error
    assert (error.kind, error.retryable, error.status_code) == (kind, False, status_code)
    assert error.message == fault.message
    assert len(fake.requests) == 1


async def test_consecutive_failures_back_off_and_honour_retry_after(
    fake: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    fake.script(
        HttpError(529, "overloaded_error"),
        HttpError(529, "overloaded_error"),
        HttpError(429, "rate_limit_error", headers={"retry-after": "10"}),
        HttpError(529, "overloaded_error"),
        Step(text="finally"),
    )
    run = await run_step(provider, question())
    assert [(r.attempt, r.error.kind, r.delay_ms) for r in run.retries] == [
        (1, "overloaded", 1000),
        (2, "overloaded", 2000),
        (3, "rate_limit", 10_000),
        (4, "overloaded", 8000),
    ]
    assert run.sleeps_s == [1, 2, 10, 8]
    assert run.text == "finally"


async def test_retries_are_bounded(fake: FakeAnthropicServer, provider: AnthropicProvider) -> None:
    fake.script(*[HttpError(529, "overloaded_error", "Overloaded")] * 3, Step(text="too late"))
    run = await run_step(provider, question(), max_attempts=3)
    assert len(run.retries) == 2
    assert run.error is not None
    assert (run.error.error.kind, run.error.error.status_code) == ("overloaded", 529)
    assert (
        run.error.error.detail is not None and "gave up after 3 attempts" in run.error.error.detail
    )
    assert len(fake.requests) == 3


async def test_partial_output_of_a_dropped_stream_precedes_the_retry(
    fake: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    fake.script(DropMidBody(PARTIAL, after_frames=5), Step(text="complete answer"))
    run = await run_step(provider, question())
    # The caller saw two words of the failed attempt, then the retry told it to drop them.
    assert run.log[:3] == [TextDelta("this"), TextDelta(" answer"), run.retries[0]]
    assert run.text == "complete answer"


# The guards fire on a held response; the next run checks that the abandoned response left the
# SDK's connection pool usable. One attempt only: a guard as short as these would make the
# timing of a second, real attempt part of the test.


@pytest.mark.parametrize("send_headers", [False, True], ids=["no-headers", "headers-only"])
async def test_startup_guard_fails_an_attempt_that_never_starts(
    fake: FakeAnthropicServer, provider: AnthropicProvider, send_headers: bool
) -> None:
    fake.script(SlowStart(Step(text="never"), send_headers=send_headers), Step(text="next run"))

    run = await run_step(provider, question(), startup_timeout_s=0.2, max_attempts=1)

    assert run.error is not None
    error = run.error.error
    assert (error.kind, error.retryable, error.status_code) == ("startup_timeout", True, None)
    assert (await run_step(provider, question())).text == "next run"


async def test_silence_guard_fails_an_attempt_that_goes_quiet(
    fake: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    fake.script(SilenceMidStream(), Step(text="next run"))

    run = await run_step(provider, question(), silence_timeout_s=0.2, max_attempts=1)

    assert run.log[:2] == [TextDelta("this"), TextDelta(" answer")]
    assert run.error is not None
    error = run.error.error
    assert (error.kind, error.retryable, error.status_code) == ("timeout", True, None)
    assert (await run_step(provider, question())).text == "next run"


async def test_a_slow_first_chunk_within_the_startup_timeout_is_fine(
    fake: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    slow = SlowStart(Step(text="late but fine"))
    fake.script(slow)
    task = asyncio.create_task(run_step(provider, question(), startup_timeout_s=60))
    await wait_for(lambda: len(fake.requests) == 1, message="the request reached the fake")
    slow.release.set()
    run = await task
    assert run.retries == []
    assert run.text == "late but fine"


async def test_refused_connection_is_a_retryable_generic_error() -> None:
    with socket.socket() as probe:  # a port that nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    adapter = AnthropicProvider(api_key=API_KEY, base_url=f"http://127.0.0.1:{port}")
    try:
        run = await run_step(adapter, question(), max_attempts=1)
    finally:
        await adapter.aclose()
    assert run.error is not None
    error = run.error.error
    assert (error.kind, error.retryable, error.status_code) == ("generic", True, None)
    assert error.message == "could not connect to the provider"


async def test_cancel_mid_stream_propagates_and_is_not_retried(
    fake: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    fake.script(SilenceMidStream(), Step(text="never"))
    first_event = asyncio.Event()

    async def on_retry(_: object) -> None:
        raise AssertionError("a cancel must not be retried")

    async def consume() -> None:
        async for _ in stream_step(provider, question(), on_retry=on_retry):
            first_event.set()

    task = asyncio.create_task(consume())
    await first_event.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(fake.requests) == 1


async def test_registry_options_override_environment(fake: FakeAnthropicServer) -> None:
    config = ModelConfig(
        id="c",
        provider="anthropic",
        model="claude-test-model",
        options={"api_key": "sk-from-options", "base_url": fake.base_url},
    )
    env = {"ANTHROPIC_API_KEY": "sk-from-env", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}
    fake.script(Step(text="hi"))
    try:
        provider = provider_for(config, env=env)
        run = await run_step(provider, question(config=config))
    finally:
        await close_providers()
    assert run.text == "hi"
    assert api_key_sent(fake.requests[0].headers) == "sk-from-options"


async def test_a_cancellation_inside_the_sdk_transport_is_retried(
    fake: FakeAnthropicServer,
) -> None:
    """A CancelledError raised by the SDK's transport mid-body (HTTP/2 RST_STREAM, a cancelled
    anyio scope) while nobody cancelled the step: retried as a transport reset."""
    transport = CancelMidStream(faults=1)
    adapter = AnthropicProvider(
        api_key=API_KEY, base_url=fake.base_url, now=fixed_now, http_client=transport.client()
    )
    fake.script(Step(text="the first try is cut"), Step(text="recovered in full"))
    try:
        run = await run_step(adapter, question())
    finally:
        await adapter.aclose()

    assert transport.cancelled == 1
    assert run.error is None
    assert [(r.error.kind, r.error.retryable) for r in run.retries] == [("timeout", True)]
    assert run.text == "recovered in full"
    assert len(fake.requests) == 2


async def test_a_retry_after_above_the_cap_fails_the_step_at_once(
    fake: FakeAnthropicServer, provider: AnthropicProvider
) -> None:
    fake.script(
        HttpError(429, "rate_limit_error", headers={"retry-after": "7200"}), Step(text="never")
    )

    run = await run_step(provider, question(), max_retry_after_s=120)

    assert run.retries == [] and run.sleeps_s == []
    assert run.error is not None
    error = run.error.error
    assert (error.kind, error.status_code, error.retry_after_s) == ("rate_limit", 429, 7200)
    assert "asked to wait 7200s" in error.message
    assert len(fake.requests) == 1
