"""Compaction and titles in the running engine, with the real Anthropic SDK against the fake
server: what the model was sent after a compaction, what the user still sees, and when a title
is (and is not) generated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from app.engine.compaction import SUMMARY_SYSTEM_PROMPT
from app.engine.prompt import SUMMARY_PREAMBLE
from app.engine.replica import Replica
from app.engine.titles import TITLE_MAX_OUTPUT_TOKENS, TITLE_SYSTEM_PROMPT
from app.providers import retry
from app.providers.catalog import close_providers
from app.state import chats
from app.state.model import default_title
from tests import engine_harness, factories
from tests.fakes import Behaviour, HttpError, RecordedRequest, SlowStart, Step, running
from tests.fakes.anthropic_server import FakeAnthropicServer, system_text, texts
from tests.fakes.scenarios import kind_of

# Prices of the fake model: 1 micro per input token, 2 per output token.
PRICES: dict[str, Any] = {"input_micros_per_mtok": 1_000_000, "output_micros_per_mtok": 2_000_000}


@pytest.fixture(autouse=True)
async def _close_sdk_clients() -> AsyncIterator[None]:
    yield
    await close_providers()


def _last_user_text(request: RecordedRequest) -> str:
    return texts([m for m in request.body["messages"] if m["role"] == "user"][-1])


def _transcript(request: RecordedRequest) -> list[tuple[str, str]]:
    return [(m["role"], texts(m)) for m in request.body["messages"]]


async def _runs_ended(replica: Replica, count: int) -> bool:
    return sum(replica.stats.run_ends.values()) >= count


# --- compaction ----------------------------------------------------------------------------

# What the fake model reports as the prompt size of each question's answer: the second and
# third answers push the context past the threshold (50 % of 1000 tokens).
INPUT_TOKENS = {"first question": 100, "second question": 600, "third question": 600}


class CompactingModel:
    def __init__(self) -> None:
        self.summaries = 0

    def __call__(self, request: RecordedRequest) -> Behaviour:
        kind = kind_of(request)
        if kind == "title":
            return Step(text="Four questions")
        if kind == "summary":
            self.summaries += 1
            return Step(text=f"SUMMARY-{self.summaries}")
        question = _last_user_text(request)
        return Step(text=f"answer to {question}", input_tokens=INPUT_TOKENS.get(question, 100))


async def test_compaction_summarizes_older_turns_and_keeps_the_history_complete(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    questions = ["first question", "second question", "third question", "fourth question"]
    async with (
        running(FakeAnthropicServer(responder=CompactingModel())) as server,
        engine_harness.running_replica(database_url, pool),
    ):
        model = await factories.create_fake_model_config(
            pool, server.base_url, context_limit=1000, compression_threshold=50, **PRICES
        )
        chat, _ = await chats.create_chat(pool, owner, questions[0], model_config_id=model)
        await engine_harness.wait_status(pool, chat.id, "waiting")
        for question in questions[1:]:
            await chats.send_message(pool, owner, chat.id, question, queue_limit=20)
            await engine_harness.wait_status(pool, chat.id, "waiting")

    steps = [r for r in server.requests if kind_of(r) == "step"]
    summaries = [r for r in server.requests if kind_of(r) == "summary"]
    assert [_last_user_text(r) for r in steps] == questions
    # No compaction for the first two turns: the whole history went to the model.
    assert _transcript(steps[1]) == [
        ("user", "first question"),
        ("assistant", "answer to first question"),
        ("user", "second question"),
    ]
    assert system_text(steps[1].body) == ""

    # Third turn: the first two turns were summarized with the chat's model ...
    assert len(summaries) == 2
    assert system_text(summaries[0].body) == SUMMARY_SYSTEM_PROMPT
    ((_, transcript),) = _transcript(summaries[0])
    assert transcript.splitlines()[0] == "user: first question"
    assert "assistant: answer to second question" in transcript
    assert "third question" not in transcript
    # ... and the step's prompt is the summary first, then the current turn only.
    assert system_text(steps[2].body) == f"{SUMMARY_PREAMBLE}\n\nSUMMARY-1"
    assert _transcript(steps[2]) == [("user", "third question")]

    # Fourth turn: the third answer was large again; the new summary folds the old one in.
    ((_, fold),) = _transcript(summaries[1])
    assert fold.splitlines()[0] == "system: (summary of earlier conversation) SUMMARY-1"
    assert "user: third question" in fold
    assert system_text(steps[3].body) == f"{SUMMARY_PREAMBLE}\n\nSUMMARY-2"
    assert _transcript(steps[3]) == [("user", "fourth question")]

    # The user's history is complete: every message, compressed or not, and both summaries.
    messages, _queued = await chats.list_messages(pool, owner, chat.id)
    shown = [(m.role, engine_harness.text_of(m.content) or m.content[0]["type"]) for m in messages]
    assert shown == [
        ("user", "first question"),
        ("assistant", "answer to first question"),
        ("user", "second question"),
        ("assistant", "answer to second question"),
        ("user", "third question"),
        ("system", "compaction"),
        ("assistant", "answer to third question"),
        ("user", "fourth question"),
        ("system", "compaction"),
        ("assistant", "answer to fourth question"),
    ]
    first_summary, second_summary = (m for m in messages if m.role == "system")
    assert first_summary.content == [
        {
            "type": "compaction",
            "summary": "SUMMARY-1",
            "compressed_message_ids": [messages[0].id, messages[3].id],
            "compressed_count": 4,
        }
    ]
    assert second_summary.content[0]["compressed_message_ids"] == [
        messages[4].id,
        messages[6].id,
    ]
    assert second_summary.content[0]["compressed_count"] == 3
    compressed = [
        row["compressed"]
        for row in await pool.fetch(
            "SELECT compressed FROM chat_messages WHERE chat_id = $1 ORDER BY id", chat.id
        )
    ]
    assert compressed == [True] * 7 + [False] * 3
    # The summaries' model calls are paid for (25 in, 7 out) and shown like an answer's.
    assert first_summary.cost_micros == 25 + 2 * 7
    assert first_summary.to_json()["usage"]["input_tokens"] == 25
    assert messages[1].cost_micros == 100 + 2 * 7
    assert messages[1].to_json()["cost_micros"] == 114


async def test_an_edit_that_removes_a_summary_brings_back_what_it_compressed(
    pool: asyncpg.Pool,
) -> None:
    owner = await factories.create_owner(pool)
    chat, first = await chats.create_chat(pool, owner, "first question")
    async with pool.acquire() as conn:
        answer = await factories.create_message(conn, chat_id=chat.id, role="assistant")
        current = await factories.create_message(conn, chat_id=chat.id, text="second question")
        summary = {
            "type": "compaction",
            "summary": "S",
            "compressed_message_ids": [first.id, answer["id"]],
            "compressed_count": 2,
        }
        await factories.create_message(conn, chat_id=chat.id, role="system", content=[summary])
        await conn.execute(
            "UPDATE chat_messages SET compressed = true WHERE id = ANY($1)",
            [first.id, answer["id"]],
        )
        await conn.execute("UPDATE chats SET status = 'waiting' WHERE id = $1", chat.id)
    await chats.edit_message(pool, owner, chat.id, current["id"], "second question, edited")
    rows = await pool.fetch(
        "SELECT role, compressed, deleted FROM chat_messages WHERE chat_id = $1 ORDER BY id",
        chat.id,
    )
    assert [(r["role"], r["compressed"], r["deleted"]) for r in rows] == [
        ("user", False, False),
        ("assistant", False, False),
        ("user", False, True),
        ("system", False, True),
        ("user", False, False),
    ]


# --- titles --------------------------------------------------------------------------------


def _titling(title: Behaviour) -> tuple[FakeAnthropicServer, list[Behaviour]]:
    """A server whose chat answers are fixed and whose title requests get `title`."""
    answers: list[Behaviour] = []

    def respond(request: RecordedRequest) -> Behaviour:
        if kind_of(request) == "title":
            return title
        answers.append(Step(text="Paris is the capital of France."))
        return answers[-1]

    return FakeAnthropicServer(responder=respond), answers


async def test_a_title_is_generated_once_from_the_first_exchange(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    server, _ = _titling(Step(text='"Capital of France."\n'))
    async with running(server), engine_harness.running_replica(database_url, pool) as replica:
        model = await factories.create_fake_model_config(pool, server.base_url)
        chat, _ = await chats.create_chat(
            pool, owner, "What is the capital of France?", model_config_id=model
        )
        assert chat.title == "What is the capital of France?"  # the fallback, at first
        await engine_harness.eventually(
            lambda: _runs_ended(replica, 1), message="the first run ended"
        )
        titled = await engine_harness.chat_row(pool, chat.id)
        assert (titled.title, titled.status) == ("Capital of France", "waiting")

        await chats.send_message(pool, owner, chat.id, "And of Spain?", queue_limit=20)
        await engine_harness.eventually(
            lambda: _runs_ended(replica, 2), message="the second run ended"
        )

    title_requests = [r for r in server.requests if kind_of(r) == "title"]
    assert len(title_requests) == 1  # once: the second turn asked for none
    (request,) = title_requests
    assert system_text(request.body) == TITLE_SYSTEM_PROMPT
    assert request.body["max_tokens"] == TITLE_MAX_OUTPUT_TOKENS
    assert "tools" not in request.body
    assert _transcript(request) == [
        (
            "user",
            "User: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
        )
    ]
    assert (await engine_harness.chat_row(pool, chat.id)).title == "Capital of France"


async def test_the_echo_model_keeps_the_fallback_title(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(database_url, pool) as replica:
        chat, message = await chats.create_chat(pool, owner, "hello there, echo model")
        await engine_harness.eventually(lambda: _runs_ended(replica, 1), message="the run ended")
    final = await engine_harness.chat_row(pool, chat.id)
    assert final.status == "waiting"
    assert final.title == default_title(message.content) == "hello there, echo model"


@pytest.mark.parametrize(
    "failure",
    [
        HttpError(529, "overloaded_error", "busy"),  # retryable: still one attempt only
        HttpError(401, "authentication_error", "bad key"),
        Step(text="   "),  # an empty title
    ],
    ids=["overloaded", "auth", "empty"],
)
async def test_a_failed_title_request_keeps_the_fallback_and_the_turn(
    database_url: str, pool: asyncpg.Pool, failure: Behaviour
) -> None:
    owner = await factories.create_owner(pool)
    server, _ = _titling(failure)
    async with (
        running(server),
        # The production seam, with retries: the title still makes one attempt.
        engine_harness.running_replica(
            database_url, pool, stream_step=retry.stream_step
        ) as replica,
    ):
        model = await factories.create_fake_model_config(pool, server.base_url)
        chat, _ = await chats.create_chat(pool, owner, "plan a short trip", model_config_id=model)
        await engine_harness.eventually(lambda: _runs_ended(replica, 1), message="the run ended")
    final = await engine_harness.chat_row(pool, chat.id)
    assert (final.status, final.last_error, final.title) == ("waiting", None, "plan a short trip")
    assert [kind_of(r) for r in server.requests] == ["step", "title"]
    history = await engine_harness.history(pool, chat.id)
    assert engine_harness.text_of(history[-1][1]) == "Paris is the capital of France."


async def test_a_title_the_user_set_meanwhile_wins(database_url: str, pool: asyncpg.Pool) -> None:
    owner = await factories.create_owner(pool)
    release = asyncio.Event()
    server, _ = _titling(SlowStart(Step(text="Generated title"), release=release))
    async with running(server), engine_harness.running_replica(database_url, pool) as replica:
        model = await factories.create_fake_model_config(pool, server.base_url)
        chat, _ = await chats.create_chat(pool, owner, "name me later", model_config_id=model)

        async def title_requested() -> bool:
            return any(kind_of(r) == "title" for r in server.requests)

        await engine_harness.eventually(title_requested, message="the title request")
        await chats.update_chat(pool, owner, chat.id, title="My own title")
        release.set()
        await engine_harness.eventually(lambda: _runs_ended(replica, 1), message="the run ended")
    assert (await engine_harness.chat_row(pool, chat.id)).title == "My own title"


async def test_a_chat_created_with_a_title_asks_for_none(
    database_url: str, pool: asyncpg.Pool
) -> None:
    owner = await factories.create_owner(pool)
    server, _ = _titling(Step(text="Unwanted"))
    async with running(server), engine_harness.running_replica(database_url, pool) as replica:
        model = await factories.create_fake_model_config(pool, server.base_url)
        chat, _ = await chats.create_chat(
            pool, owner, "a question", model_config_id=model, title="Chosen"
        )
        await engine_harness.eventually(lambda: _runs_ended(replica, 1), message="the run ended")
    assert [kind_of(r) for r in server.requests] == ["step"]
    assert (await engine_harness.chat_row(pool, chat.id)).title == "Chosen"
