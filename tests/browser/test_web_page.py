"""The web page in a real Chromium against real `chatd serve` processes (the built-in echo
model; a slow variant of it so that answers can be watched, stopped and interrupted mid-way).

Covered: logging in with a token and with the one-time URL of an embedded chatd, logging out;
an answer growing while it streams; safe markdown; tool calls; Stop keeping the partial
answer; edit; the queue (delete, send now); a reload and a replica crash mid-stream, recovered
without a duplicated or missing word; another user's chat unreachable; two tabs in step;
keyboard use at 375 px. Screenshots of the main states are saved as artifacts."""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytest.importorskip(
    "playwright", reason="browser tests skipped: the playwright package is not installed"
)

from playwright.async_api import Browser, expect

from tests.browser.harness import (
    SLOW_MODEL,
    Chatd,
    answers,
    api_status,
    button,
    live_answer,
    live_texts,
    log_in_with_token,
    message_box,
    new_page,
    running_chatd,
    send,
    start_chat,
    user_messages,
    wait_live_words,
    words,
)
from tests.conditions import wait_for
from tests.e2e.replicas import ReplicaProcess

pytestmark = pytest.mark.e2e


@pytest.fixture
async def chatd(tmp_path: Path, database_url: str) -> AsyncIterator[Chatd]:
    async with running_chatd(tmp_path, database_url) as server:
        yield server


def _check_prefixes(seen: list[str], final: str) -> None:
    """Every text the answer in progress showed was the start of the final answer: no word
    shown twice, none skipped, nothing foreign."""
    assert seen, "the answer was never seen in progress"
    wrong = [text for text in seen if not final.startswith(text)]
    assert not wrong, f"shown while streaming, not a prefix of {final!r}: {wrong[:3]}"


# --------------------------------------------------------------------------------------------
# Logging in and out.


async def test_logging_in_with_a_token_and_out(
    browser: Browser, chatd: Chatd, artifacts: Path
) -> None:
    context = await browser.new_context()
    page = await new_page(context)
    await page.goto(chatd.url + "/")
    token_field = page.get_by_label("API token")
    await expect(token_field).to_be_visible()
    await expect(token_field).to_be_focused()
    await page.screenshot(path=artifacts / "login.png")

    await token_field.fill("chatd_not-a-token")
    await button(page, "Log in").click()
    await expect(page.locator("#login-error")).to_have_text("That token was not accepted.")

    await log_in_with_token(page, chatd.url, await chatd.token("alice"))
    await expect(page.locator("#whoami")).to_have_text("alice")
    (cookie,) = [c for c in await context.cookies() if c["name"] == "chatd_session"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert await page.evaluate("document.cookie") == ""  # out of reach of page scripts

    await page.reload()  # the session outlives the page
    await expect(page.locator("#whoami")).to_have_text("alice")
    assert await api_status(page, "/api/v1/chats") == 200

    await button(page, "Log out").click()
    await expect(token_field).to_be_visible()
    await expect(page.locator("#login-error")).to_have_text("You are logged out.")
    assert await api_status(page, "/api/v1/chats") == 401
    await page.reload()
    await expect(token_field).to_be_visible()
    await context.close()


async def test_the_one_time_url_of_an_embedded_chatd_logs_in_once_and_chats(
    browser: Browser, tmp_path: Path, artifacts: Path
) -> None:
    """`make run` as a new user meets it: chatd serve with its own database prints a URL; one
    click on it gives a logged-in page, and a streaming answer."""
    data_dir = Path(tempfile.mkdtemp(prefix="chatd-web-"))  # short: the PG socket lives there
    replica = ReplicaProcess(
        log_dir=tmp_path, env={"DATABASE_URL": "", "CHATD_DATA_DIR": str(data_dir)}
    )
    replica.start()
    try:
        await replica.wait_healthy(timeout_s=120)
        printed = await wait_for(
            lambda: re.search(r"one-time link\): (\S+)", replica.logs()),
            timeout_s=30,
            message="the login URL in the output of chatd serve",
        )
        assert printed is not None
        url = printed[1]
        assert url.startswith(f"{replica.url}/login#code=")

        context = await browser.new_context()
        page = await new_page(context)
        await page.goto(url)
        await expect(button(page, "New chat")).to_be_visible()
        await expect(page.locator("#whoami")).to_have_text("local")
        assert page.url == f"{replica.url}/"  # the code is out of the address bar and history

        await start_chat(page, "hello there")
        await expect(answers(page).locator(".content")).to_have_text("echo: hello there")
        await page.screenshot(path=artifacts / "first-answer.png")

        # The link is spent: another browser opening it gets the login form and why.
        other = await (await browser.new_context()).new_page()
        await other.goto(url)
        await expect(other.get_by_label("API token")).to_be_visible()
        await expect(other.locator("#login-error")).to_contain_text("expired or was already used")
        assert "code=" not in other.url
    finally:
        replica.signal(signal.SIGTERM)
        try:
            await replica.wait_exit()
        finally:
            replica.kill()
            shutil.rmtree(data_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Chatting.


async def test_an_answer_grows_while_it_streams(
    browser: Browser, chatd: Chatd, artifacts: Path
) -> None:
    page = await new_page(await browser.new_context())
    await log_in_with_token(page, chatd.url, await chatd.token("bob"))
    text = words(40)
    await start_chat(page, text, model=SLOW_MODEL)
    await wait_live_words(page, 10)
    await expect(button(page, "Stop")).to_be_enabled()
    await page.screenshot(path=artifacts / "streaming.png")

    final = f"echo: {text}"
    await expect(answers(page).locator(".content")).to_have_text(final)
    await expect(live_answer(page)).to_have_count(0)
    await expect(page.locator("#chat-status")).to_have_text("waiting")
    await expect(button(page, "Stop")).to_be_disabled()
    seen = await live_texts(page)
    _check_prefixes(seen, final)
    partial_lengths = {len(text) for text in seen if text != final}
    assert len(partial_lengths) >= 3, f"seen at only {sorted(partial_lengths)} characters"
    # The chat list says so too, from the watch stream.
    await expect(page.locator("#chat-list .status")).to_have_text("waiting")


async def test_model_output_is_rendered_as_text_not_html(
    browser: Browser, chatd: Chatd, artifacts: Path
) -> None:
    page = await new_page(await browser.new_context())
    await log_in_with_token(page, chatd.url, await chatd.token("carol"))
    hostile = (
        '**bold** <img src=x onerror="window.__xss=1"> [bad](javascript:window.__xss=2)'
        " <script>window.__xss=3</script> [good](https://example.com/docs) `<b>code</b>`"
    )
    await start_chat(page, hostile)
    answer = answers(page).locator(".content")
    await expect(answer).to_contain_text("<script>window.__xss=3</script>")
    await expect(answer.locator("strong")).to_have_text("bold")
    await expect(answer.locator("code")).to_have_text("<b>code</b>")
    links = answer.get_by_role("link")
    await expect(links).to_have_count(1)
    await expect(links).to_have_text("good")
    await expect(links).to_have_attribute("href", "https://example.com/docs")
    await expect(answer).to_contain_text('<img src=x onerror="window.__xss=1">')
    await expect(answer).to_contain_text("[bad](javascript:window.__xss=2)")
    assert await page.locator("#messages img, #messages script, #messages b").count() == 0
    assert await page.evaluate("window.__xss === undefined")
    await page.screenshot(path=artifacts / "markdown.png")


async def test_tool_calls_and_results_are_shown(browser: Browser, chatd: Chatd) -> None:
    page = await new_page(await browser.new_context())
    await log_in_with_token(page, chatd.url, await chatd.token("dave"))
    await start_chat(page, '/tool add {"a": 40, "b": 2}')
    await expect(answers(page).last.locator(".content")).to_have_text("echo: add returned 42")
    call = page.locator("details.tool-call")
    result = page.locator("details.tool-result")
    await expect(call.locator("summary")).to_have_text("Tool call: add")
    await expect(result.locator("summary")).to_have_text("Result of add")
    await expect(result.locator("pre")).to_be_hidden()  # collapsed until asked for
    await result.locator("summary").click()
    await expect(result.locator("pre")).to_have_text("42")
    await call.locator("summary").click()
    await expect(call.locator("pre")).to_contain_text('"a": 40')


async def test_stop_keeps_the_partial_answer(
    browser: Browser, chatd: Chatd, artifacts: Path
) -> None:
    page = await new_page(await browser.new_context())
    await log_in_with_token(page, chatd.url, await chatd.token("erin"))
    text = words(300)
    await start_chat(page, text, model=SLOW_MODEL)
    shown = await wait_live_words(page, 8)
    await button(page, "Stop").click()
    await expect(page.locator("#chat-status")).to_have_text("waiting")
    await expect(answers(page)).to_have_count(1)
    await expect(live_answer(page)).to_have_count(0)
    kept = str(await answers(page).locator(".content").text_content())
    full = f"echo: {text}"
    assert full.startswith(kept)
    assert len(shown) <= len(kept) < len(full)
    await expect(button(page, "Stop")).to_be_disabled()
    await page.screenshot(path=artifacts / "stopped.png")
    await page.reload()
    await expect(answers(page).locator(".content")).to_have_text(kept)


async def test_editing_a_message_replaces_the_later_history(
    browser: Browser, chatd: Chatd, artifacts: Path
) -> None:
    page = await new_page(await browser.new_context())
    await log_in_with_token(page, chatd.url, await chatd.token("frank"))
    await start_chat(page, "first question")
    await expect(answers(page)).to_have_count(1)
    await send(page, "second question")
    await expect(answers(page)).to_have_count(2)
    await expect(answers(page).last.locator(".content")).to_have_text("echo: second question")

    await user_messages(page).first.get_by_role("button", name="Edit message").click()
    editor = page.get_by_role("textbox", name="Edit message")
    await expect(editor).to_have_value("first question")
    await editor.fill("edited question")
    await button(page, "Save").click()

    await expect(user_messages(page).locator(".content")).to_have_text(["edited question"])
    await expect(answers(page).locator(".content")).to_have_text(["echo: edited question"])
    await expect(page.locator("#messages")).not_to_contain_text("second question")
    await expect(page.locator("#messages")).not_to_contain_text("first question")
    await page.screenshot(path=artifacts / "edited.png")


async def test_messages_sent_while_busy_queue_and_can_be_deleted_or_sent_now(
    browser: Browser, chatd: Chatd, artifacts: Path
) -> None:
    page = await new_page(await browser.new_context())
    await log_in_with_token(page, chatd.url, await chatd.token("grace"))
    text = words(300)
    await start_chat(page, text, model=SLOW_MODEL)
    await wait_live_words(page, 3)
    await send(page, "queued one")
    await send(page, "queued two")
    queue = page.get_by_role("region", name="Queued messages")
    await expect(queue.locator(".queued-text")).to_have_text(["queued one", "queued two"])
    await page.screenshot(path=artifacts / "queue.png")

    await queue.get_by_role("button", name="Delete queued message: queued one").click()
    await expect(queue.locator(".queued-text")).to_have_text(["queued two"])
    await queue.get_by_role("button", name="Send now: queued two").click()
    # The run stops (its partial answer stays) and the promoted message is answered next.
    await expect(queue).to_be_hidden()
    await expect(user_messages(page).locator(".content")).to_have_text([text, "queued two"])
    await expect(answers(page)).to_have_count(2)
    await expect(answers(page).last.locator(".content")).to_have_text("echo: queued two")
    partial = str(await answers(page).first.locator(".content").text_content())
    assert f"echo: {text}".startswith(partial) and len(partial) < len(f"echo: {text}")
    await expect(page.locator("#messages")).not_to_contain_text("queued one")


# --------------------------------------------------------------------------------------------
# Reconnecting.


async def test_a_reload_mid_stream_resumes_without_duplicates(
    browser: Browser, chatd: Chatd
) -> None:
    page = await new_page(await browser.new_context())
    await log_in_with_token(page, chatd.url, await chatd.token("heidi"))
    text = words(60)
    chat_id = await start_chat(page, text, model=SLOW_MODEL)
    await wait_live_words(page, 10)

    await page.reload()
    assert page.url.endswith(f"#/chats/{chat_id}")
    await expect(live_answer(page)).to_be_visible()  # back in the middle of the answer
    final = f"echo: {text}"
    await expect(answers(page).locator(".content")).to_have_text([final])
    await expect(user_messages(page).locator(".content")).to_have_text([text])
    _check_prefixes(await live_texts(page), final)


async def test_a_replica_crash_mid_stream_is_recovered_by_the_page(
    browser: Browser, chatd: Chatd, artifacts: Path
) -> None:
    page = await new_page(await browser.new_context())
    await log_in_with_token(page, chatd.url, await chatd.token("ivan"))
    text = words(50)
    await start_chat(page, text, model=SLOW_MODEL)
    await wait_live_words(page, 8)

    await chatd.crash()
    await expect(page.locator("#connection")).to_have_text("Reconnecting…")
    await page.screenshot(path=artifacts / "reconnecting.png")
    await chatd.replace()

    # The replacement requeues the dead replica's chat and answers it again from the start; the
    # page follows from its cursor: one answer, every word once.
    final = f"echo: {text}"
    await expect(answers(page).locator(".content")).to_have_text([final], timeout=90_000)
    await expect(page.locator("#connection")).to_be_hidden()
    await expect(page.locator("#chat-status")).to_have_text("waiting")
    _check_prefixes(await live_texts(page), final)
    # The chat list's watch stream came back too: it sees the next chat.
    await start_chat(page, "after the crash")
    await expect(page.locator("#chat-list li")).to_have_count(2)


# --------------------------------------------------------------------------------------------
# Users, tabs, keyboard.


async def test_another_users_chat_is_not_reachable(browser: Browser, chatd: Chatd) -> None:
    alice = await new_page(await browser.new_context())
    await log_in_with_token(alice, chatd.url, await chatd.token("alice"))
    chat_id = await start_chat(alice, "alice's secret")
    await expect(answers(alice)).to_have_count(1)

    mallory = await new_page(await browser.new_context())
    await log_in_with_token(mallory, chatd.url, await chatd.token("mallory"))
    await mallory.goto(f"{chatd.url}/#/chats/{chat_id}")
    await expect(mallory.locator("#not-found")).to_have_text(
        "This chat does not exist, or it is not yours."
    )
    await expect(message_box(mallory)).to_be_hidden()
    await expect(mallory.locator("#messages")).to_be_empty()
    await expect(mallory.locator("#chat-list li")).to_have_count(0)
    for path in (f"/api/v1/chats/{chat_id}", f"/api/v1/chats/{chat_id}/messages"):
        assert await api_status(mallory, path) == 404
    assert await api_status(mallory, f"/api/v1/chats/{chat_id}/stream") == 404


async def test_two_tabs_stay_in_step(browser: Browser, chatd: Chatd) -> None:
    context = await browser.new_context()
    first = await new_page(context)
    await log_in_with_token(first, chatd.url, await chatd.token("judy"))
    second = await new_page(context)
    await second.goto(chatd.url + "/")  # the same browser: already logged in
    await expect(button(second, "New chat")).to_be_visible()

    text = words(30)
    chat_id = await start_chat(first, text, model=SLOW_MODEL)
    chat_link = second.locator(f'#chat-list a[href="#/chats/{chat_id}"]')
    await expect(chat_link).to_be_visible()  # the list is live
    await chat_link.click()
    await wait_live_words(second, 3)
    final = f"echo: {text}"
    for page in (first, second):
        await expect(answers(page).locator(".content")).to_have_text([final])
        _check_prefixes(await live_texts(page), final)

    await button(first, "Archive").click()
    await expect(button(first, "Unarchive")).to_be_visible()
    await expect(chat_link).to_be_hidden()  # archived chats are hidden by default
    await second.get_by_label("Show archived").check()
    await expect(chat_link).to_contain_text("archived")
    await expect(button(second, "Unarchive")).to_be_visible()


async def test_keyboard_use_on_a_narrow_screen(
    browser: Browser, chatd: Chatd, artifacts: Path
) -> None:
    context = await browser.new_context(viewport={"width": 375, "height": 740})
    page = await new_page(context)
    await page.goto(chatd.url + "/")
    await expect(page.get_by_label("API token")).to_be_focused()
    await page.keyboard.type(await chatd.token("kim"))
    await page.keyboard.press("Enter")
    new_chat = button(page, "New chat")
    await expect(new_chat).to_be_visible()

    for _ in range(20):  # Tab to "New chat"
        if await new_chat.evaluate("node => node === document.activeElement"):
            break
        await page.keyboard.press("Tab")
    await expect(new_chat).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(message_box(page)).to_be_focused()
    await page.keyboard.type("line one")
    await page.keyboard.press("Shift+Enter")
    await page.keyboard.type("line two")
    await expect(message_box(page)).to_have_value("line one\nline two")
    await page.keyboard.press("Enter")
    await expect(user_messages(page).locator(".content")).to_have_text(["line one\nline two"])
    await expect(answers(page).locator(".content")).to_have_text(["echo: line one line two"])

    for name in ("Send", "Stop", "Archive"):
        await expect(button(page, name)).to_be_in_viewport()
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await page.screenshot(path=artifacts / "narrow-chat.png")

    await page.get_by_role("link", name="Chats").click()  # back to the list
    await expect(page.locator("#chat-list li")).to_have_count(1)
    await expect(message_box(page)).to_be_hidden()
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await page.screenshot(path=artifacts / "narrow-list.png")
