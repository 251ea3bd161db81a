"""What the page shows for the events a real model rarely produces on demand: reasoning, a
retry with its countdown, a failed run's error, sub-agents. The page is served by an
in-process API instance (tests/http_harness.py) with no worker: the test writes the live parts,
retries and statuses with SQL the way the engine does, so each event comes exactly when the
test wants it."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

pytest.importorskip(
    "playwright", reason="browser tests skipped: the playwright package is not installed"
)

from playwright.async_api import Browser, Page, expect

from app.db.queries import Conn
from tests import factories
from tests.browser.harness import live_answer, log_in_with_token, new_page, start_chat
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, SimulatedWorker, api_instance

pytestmark = pytest.mark.e2e


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url) as instance:
        yield instance


async def _logged_in(browser: Browser, api: ApiInstance, name: str) -> tuple[Page, ApiUser]:
    user = await factories.create_api_user(api.pool, name=name)
    page = await new_page(await browser.new_context())
    await log_in_with_token(page, api.url("/").rstrip("/"), user.token)
    return page, user


async def _parts(
    db: asyncpg.Pool | Conn,
    chat_id: uuid.UUID,
    generation: int,
    parts: list[dict[str, Any]],
    role: str = "assistant",
) -> None:
    """One flush window of live parts, as the engine's flusher writes it."""
    await db.execute(
        """
        INSERT INTO chat_stream_parts (chat_id, generation, message_role, part)
        SELECT $1, $2, $3, p::jsonb FROM unnest($4::text[]) WITH ORDINALITY AS t(p, n)
        ORDER BY n
        """,
        chat_id,
        generation,
        role,
        [json.dumps(part) for part in parts],
    )


async def _retry(
    pool: asyncpg.Pool, chat_id: uuid.UUID, generation: int, retrying_at: datetime
) -> None:
    """A retry notice: the step's parts are voided and the control part says when it retries."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM chat_stream_parts WHERE chat_id = $1", chat_id)
        await _parts(
            conn,
            chat_id,
            generation,
            [
                {
                    "type": "retry",
                    "attempt": 2,
                    "delay_ms": 20_000,
                    "retrying_at": retrying_at.isoformat(),
                    "kind": "overloaded",
                    "provider": "anthropic",
                    "status_code": 529,
                    "error": "overloaded",
                }
            ],
            role="system",
        )


def _seconds(text: str | None) -> int:
    match = re.search(r"Retrying in (\d+) s", text or "")
    assert match is not None, text
    return int(match[1])


async def test_reasoning_a_retry_countdown_and_an_error_are_shown(
    browser: Browser, api: ApiInstance, artifacts: Path
) -> None:
    page, _user = await _logged_in(browser, api, "olivia")
    chat_id = uuid.UUID(await start_chat(page, "think hard"))
    worker = SimulatedWorker(api.pool, chat_id)
    generation = await worker.acquire()
    await _parts(
        api.pool,
        chat_id,
        generation,
        [
            {"type": "reasoning", "text": "Let me think"},
            {"type": "reasoning", "text": " step by step."},
            {"type": "text", "text": "The answer"},
        ],
    )
    reasoning = live_answer(page).locator("details.reasoning")
    await expect(reasoning.locator("summary")).to_have_text("Reasoning")
    await expect(reasoning.locator("p")).to_be_hidden()  # collapsed
    await reasoning.locator("summary").click()
    await expect(reasoning.locator("p")).to_have_text("Let me think step by step.")
    await _parts(api.pool, chat_id, generation, [{"type": "text", "text": " grows."}])
    await expect(live_answer(page).locator(".markdown")).to_have_text("The answer grows.")
    await expect(reasoning.locator("p")).to_be_visible()  # still open after the re-render
    await page.screenshot(path=artifacts / "reasoning.png")

    # A retry drops the live parts and counts down to retrying_at.
    await _retry(api.pool, chat_id, generation, datetime.now(UTC) + timedelta(seconds=20))
    banner = page.locator("#retry-banner")
    await expect(banner).to_have_text(
        re.compile(r"Retrying in \d+ s \(attempt 2: overloaded, anthropic\)")
    )
    await expect(live_answer(page)).to_have_count(0)
    first = _seconds(await banner.text_content())
    assert 0 < first <= 20
    await expect(banner).not_to_have_text(re.compile(rf"Retrying in {first} s"))
    assert _seconds(await banner.text_content()) < first  # it counts down
    await page.screenshot(path=artifacts / "retry.png")

    # The run fails for good: the error's message and kind.
    await worker.finish(
        "error",
        last_error={
            "message": "the provider refused the request",
            "kind": "invalid_request",
            "provider": "anthropic",
            "retryable": False,
            "status_code": 400,
        },
    )
    await expect(page.locator("#error-banner")).to_have_text(
        "Error (invalid_request): the provider refused the request"
    )
    await expect(page.locator("#chat-status")).to_have_text("error")
    await expect(banner).to_be_hidden()
    await page.screenshot(path=artifacts / "error.png")

    # A reload shows the same error (it comes with the stream's snapshot).
    await page.reload()
    await expect(page.locator("#error-banner")).to_have_text(
        "Error (invalid_request): the provider refused the request"
    )


async def test_sub_agents_are_linked_from_their_parent(browser: Browser, api: ApiInstance) -> None:
    page, user = await _logged_in(browser, api, "peggy")
    parent_id = uuid.UUID(await start_chat(page, "delegate this"))
    async with api.pool.acquire() as conn:
        child = await factories.create_chat(
            conn, owner_id=user.id, parent_chat_id=parent_id, title="helper agent"
        )
    child_id = child["id"]

    children = page.get_by_role("navigation", name="Sub-agents")
    await expect(children.get_by_role("link")).to_have_text("helper agent (waiting)")
    await expect(page.locator("#chat-list li")).to_have_count(1)  # the list shows top-level chats

    # The spawn_agent result in the answer links the child too.
    worker = SimulatedWorker(api.pool, parent_id)
    generation = await worker.acquire()
    await _parts(
        api.pool,
        parent_id,
        generation,
        [{"type": "tool_call", "id": "c1", "name": "spawn_agent", "args": {"task": "help"}}],
    )
    result = {"chat_id": str(child_id), "title": "helper agent", "status": "waiting"}
    await _parts(
        api.pool,
        parent_id,
        generation,
        [
            {
                "type": "tool_result",
                "tool_call_id": "c1",
                "name": "spawn_agent",
                "result": result,
                "is_error": False,
            }
        ],
        role="tool",
    )
    await expect(live_answer(page).locator("details.tool-call summary")).to_have_text(
        "Tool call: spawn_agent"
    )
    await live_answer(page).locator("details.tool-result summary").click()
    await live_answer(page).get_by_role("link", name="Open the sub-agent's chat").click()
    await expect(page).to_have_url(re.compile(rf"#/chats/{child_id}$"))
    await expect(page.locator("#chat-title")).to_have_text("helper agent")
    await expect(page.locator("#parent-link")).to_have_text("Sub-agent of delegate this")
    await page.locator("#parent-link").get_by_role("link").click()
    await expect(page).to_have_url(re.compile(rf"#/chats/{parent_id}$"))
    await expect(page.locator("#chat-title")).to_have_text("delegate this")
