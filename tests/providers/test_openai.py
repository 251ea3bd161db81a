"""The OpenAI adapter through the real SDK, over real HTTP, against the fake Chat Completions
API: a tool conversation, what the SDK sent, and every scripted fault through the retry loop."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

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
from app.providers.openai import OpenAIProvider
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
from tests.fakes.openai_server import FakeOpenAIServer
from tests.fakes.transport import CancelMidStream

API_KEY = "sk-openai-test-key"
CONFIG = ModelConfig(id="gpt", provider="openai", model="gpt-test-model")
READ_FILE = ToolSpec(
    name="read_file",
    description="Read a file of the workspace.",
    input_schema={"type": "object", "properties": {"path": {"type": "string"}}},
)
USER = PromptMessage("user", [{"type": "text", "text": "What do the notes say?"}])


def question(*messages: PromptMessage, config: ModelConfig = CONFIG) -> ModelRequest:
    return ModelRequest(
        config=config,
        messages=[USER, *messages],
        system="You are a careful assistant.",
        tools=[READ_FILE],
        max_output_tokens=1024,
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIServer]:
    async with running(FakeOpenAIServer()) as server:
        yield server


@pytest.fixture
async def provider(fake: FakeOpenAIServer) -> AsyncIterator[OpenAIProvider]:
    adapter = OpenAIProvider(api_key=API_KEY, base_url=fake.base_url, now=fixed_now)
    try:
        yield adapter
    finally:
        await adapter.aclose()


async def test_tool_conversation(fake: FakeOpenAIServer, provider: OpenAIProvider) -> None:
    fake.script(
        Step(
            reasoning="two files",
            text="Let me read them.",
            tool_calls=(
                ToolUse("call_1", "read_file", {"path": "notes.txt"}),
                ToolUse("call_2", "read_file", {"path": "todo.txt"}),
            ),
            input_tokens=120,
            output_tokens=30,
        ),
        Step(text="Hello, and nothing to do.", input_tokens=40, cache_read_tokens=1024),
    )

    first = await run_step(provider, question())

    assert first.error is None and first.retries == []
    assert first.log == [
        ReasoningDelta("two"),
        ReasoningDelta(" files"),
        TextDelta("Let"),
        TextDelta(" me"),
        TextDelta(" read"),
        TextDelta(" them."),
        ToolCall("call_1", "read_file", {"path": "notes.txt"}),
        ToolCall("call_2", "read_file", {"path": "todo.txt"}),
        StepFinished("tool_use", Usage(120, 30)),
    ]

    assistant = PromptMessage(
        "assistant",
        [
            {"type": "reasoning", "text": "two files"},
            {"type": "text", "text": "Let me read them."},
            {
                "type": "tool_call",
                "id": "call_1",
                "name": "read_file",
                "args": {"path": "notes.txt"},
            },
            {
                "type": "tool_call",
                "id": "call_2",
                "name": "read_file",
                "args": {"path": "todo.txt"},
            },
        ],
    )
    results = PromptMessage(
        "tool",
        [
            {
                "type": "tool_result",
                "tool_call_id": "call_1",
                "name": "read_file",
                "result": {"content": "hello"},
                "is_error": False,
            },
            {
                "type": "tool_result",
                "tool_call_id": "call_2",
                "name": "read_file",
                "result": "no such file",
                "is_error": True,
            },
        ],
    )
    second = await run_step(provider, question(assistant, results))

    # OpenAI counts cached tokens inside prompt_tokens; chatd's input_tokens excludes them.
    assert second.events[-1] == StepFinished(
        "end_turn", Usage(input_tokens=40, output_tokens=7, cache_read_tokens=1024)
    )
    assert second.text == "Hello, and nothing to do."

    sent = fake.requests[1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.body["model"] == "gpt-test-model"
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["max_completion_tokens"] == 1024
    assert sent.body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "read_file",
                "description": "Read a file of the workspace.",
                "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
            },
        }
    ]
    messages = sent.body["messages"]
    # Chat Completions has no reasoning input: the reasoning part is not sent back.
    assert messages[:3] == [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "What do the notes say?"},
        {
            "role": "assistant",
            "content": "Let me read them.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path": "todo.txt"}'},
                },
            ],
        },
    ]
    assert messages[3:] == [
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"content": "hello"})},
        {"role": "tool", "tool_call_id": "call_2", "content": "Error: no such file"},
    ]


async def test_servers_without_usage_chunks_can_opt_out(
    fake: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    config = ModelConfig(
        id="local", provider="openai", model="llama", options={"stream_usage": False}
    )
    # role, three words, finish_reason: then the body ends, as a server without usage ends it.
    fake.script(EndEarly(Step(text="all of it"), after_frames=5))

    run = await run_step(provider, question(config=config))

    assert "stream_options" not in fake.requests[0].body
    assert run.retries == []
    assert run.log[-1] == StepFinished("end_turn", Usage())
    assert run.text == "all of it"


RETRY_AT_DATE = email.utils.format_datetime(FIXED_NOW + timedelta(seconds=30), usegmt=True)


@pytest.mark.parametrize(
    ("fault", "kind", "status_code", "delay_ms"),
    [
        pytest.param(
            HttpError(429, "requests", code="rate_limit_exceeded", headers={"retry-after": "7"}),
            "rate_limit",
            429,
            7000,
            id="429-retry-after-seconds",
        ),
        pytest.param(
            HttpError(
                429, "tokens", code="rate_limit_exceeded", headers={"retry-after-ms": "2500"}
            ),
            "rate_limit",
            429,
            2500,
            id="429-retry-after-ms",
        ),
        pytest.param(
            HttpError(429, "requests", headers={"retry-after": RETRY_AT_DATE}),
            "rate_limit",
            429,
            30_000,
            id="429-retry-after-http-date",
        ),
        pytest.param(HttpError(429, "requests"), "rate_limit", 429, 1000, id="429-no-header"),
        pytest.param(
            HttpError(500, "server_error", "The server had an error"),
            "generic",
            500,
            1000,
            id="500",
        ),
        pytest.param(HttpError(502, None, "Bad Gateway"), "generic", 502, 1000, id="502-html"),
        pytest.param(
            HttpError(503, "server_error", "The engine is currently overloaded"),
            "overloaded",
            503,
            1000,
            id="503-overloaded",
        ),
        pytest.param(
            StreamError("server_error", "The server had an error while processing"),
            "generic",
            None,
            1000,
            id="in-stream-server-error",
        ),
        pytest.param(DropMidBody(), "timeout", None, 1000, id="connection-dropped-mid-body"),
        pytest.param(EndEarly(), "timeout", None, 1000, id="ends-before-finish-reason"),
        # role, two words, finish_reason: the usage chunk and [DONE] never come.
        pytest.param(
            EndEarly(Step(text="cut here"), after_frames=4),
            "timeout",
            None,
            1000,
            id="ends-before-usage-chunk",
        ),
    ],
)
async def test_retryable_faults_are_retried_then_succeed(
    fake: FakeOpenAIServer,
    provider: OpenAIProvider,
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
    assert run.retries[0].error.provider == "openai"
    assert run.retries[0].delay_ms == delay_ms
    assert run.retries[0].retrying_at == FIXED_NOW + timedelta(milliseconds=delay_ms)
    assert run.text == "recovered"
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("fault", "kind", "status_code"),
    [
        pytest.param(
            HttpError(
                429,
                "insufficient_quota",
                "You exceeded your current quota",
                code="insufficient_quota",
            ),
            "usage_limit",
            429,
            id="429-insufficient-quota",
        ),
        pytest.param(
            HttpError(401, "invalid_request_error", "Incorrect API key", code="invalid_api_key"),
            "auth",
            401,
            id="401",
        ),
        pytest.param(
            HttpError(403, "invalid_request_error", "Country not supported"),
            "auth",
            403,
            id="403",
        ),
        pytest.param(
            HttpError(
                400,
                "invalid_request_error",
                "maximum context length exceeded",
                code="context_length_exceeded",
            ),
            "config",
            400,
            id="400-context-length",
        ),
        pytest.param(
            HttpError(404, "invalid_request_error", "model not found", code="model_not_found"),
            "config",
            404,
            id="404-unknown-model",
        ),
    ],
)
async def test_non_retryable_faults_fail_at_once(
    fake: FakeOpenAIServer,
    provider: OpenAIProvider,
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


async def test_retries_are_bounded(fake: FakeOpenAIServer, provider: OpenAIProvider) -> None:
    fake.script(*[HttpError(500, "server_error")] * 3, Step(text="too late"))
    run = await run_step(provider, question(), max_attempts=3)
    assert [r.delay_ms for r in run.retries] == [1000, 2000]
    assert run.error is not None
    assert (run.error.error.kind, run.error.error.status_code) == ("generic", 500)
    assert run.error.error.detail is not None
    assert "gave up after 3 attempts" in run.error.error.detail
    assert len(fake.requests) == 3


async def test_partial_output_of_a_dropped_stream_precedes_the_retry(
    fake: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    fake.script(DropMidBody(PARTIAL, after_frames=3), Step(text="complete answer"))
    run = await run_step(provider, question())
    assert run.log[:3] == [TextDelta("this"), TextDelta(" answer"), run.retries[0]]
    assert run.text == "complete answer"


# The guards fire on a held response; the next run checks that the abandoned response left the
# SDK's connection pool usable. One attempt only: a guard as short as these would make the
# timing of a second, real attempt part of the test.


@pytest.mark.parametrize("send_headers", [False, True], ids=["no-headers", "headers-only"])
async def test_startup_guard_fails_an_attempt_that_never_starts(
    fake: FakeOpenAIServer, provider: OpenAIProvider, send_headers: bool
) -> None:
    fake.script(SlowStart(Step(text="never"), send_headers=send_headers), Step(text="next run"))

    run = await run_step(provider, question(), startup_timeout_s=0.2, max_attempts=1)

    assert run.error is not None
    error = run.error.error
    assert (error.kind, error.retryable, error.status_code) == ("startup_timeout", True, None)
    assert (await run_step(provider, question())).text == "next run"


async def test_silence_guard_fails_an_attempt_that_goes_quiet(
    fake: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    fake.script(SilenceMidStream(), Step(text="next run"))

    run = await run_step(provider, question(), silence_timeout_s=0.2, max_attempts=1)

    assert run.log[:2] == [TextDelta("this"), TextDelta(" answer")]
    assert run.error is not None
    error = run.error.error
    assert (error.kind, error.retryable, error.status_code) == ("timeout", True, None)
    assert (await run_step(provider, question())).text == "next run"


async def test_a_slow_first_chunk_within_the_startup_timeout_is_fine(
    fake: FakeOpenAIServer, provider: OpenAIProvider
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
    adapter = OpenAIProvider(api_key=API_KEY, base_url=f"http://127.0.0.1:{port}/v1")
    try:
        run = await run_step(adapter, question(), max_attempts=1)
    finally:
        await adapter.aclose()
    assert run.error is not None
    error = run.error.error
    assert (error.kind, error.retryable, error.status_code) == ("generic", True, None)
    assert error.message == "could not connect to the provider"


async def test_cancel_mid_stream_propagates_and_is_not_retried(
    fake: FakeOpenAIServer, provider: OpenAIProvider
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


async def test_registry_reads_key_and_base_url_from_the_environment(
    fake: FakeOpenAIServer,
) -> None:
    env = {"OPENAI_API_KEY": "sk-from-env", "OPENAI_BASE_URL": fake.base_url}
    fake.script(Step(text="hi"))
    try:
        provider = provider_for(CONFIG, env=env)
        run = await run_step(provider, question())
    finally:
        await close_providers()
    assert run.text == "hi"
    assert fake.requests[0].headers["authorization"] == "Bearer sk-from-env"


async def test_a_cancellation_inside_the_sdk_transport_is_retried(fake: FakeOpenAIServer) -> None:
    """A CancelledError raised by the SDK's transport mid-body (HTTP/2 RST_STREAM, a cancelled
    anyio scope) while nobody cancelled the step: retried as a transport reset."""
    transport = CancelMidStream(faults=1)
    adapter = OpenAIProvider(
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
    fake: FakeOpenAIServer, provider: OpenAIProvider
) -> None:
    fake.script(
        HttpError(429, "rate_limit_exceeded", headers={"retry-after": "7200"}), Step(text="never")
    )

    run = await run_step(provider, question(), max_retry_after_s=120)

    assert run.retries == [] and run.sleeps_s == []
    assert run.error is not None
    error = run.error.error
    assert (error.kind, error.status_code, error.retry_after_s) == ("rate_limit", 429, 7200)
    assert "asked to wait 7200s" in error.message
    assert len(fake.requests) == 1
