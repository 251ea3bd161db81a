"""What the browser tests share: a real `chatd serve` on the test database (restartable at the
same address), users and a slow echo model, and the page's controls by their accessible names.

Every wait is on a condition (Playwright's expect / wait_for_function), never a sleep."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from playwright.async_api import BrowserContext, Locator, Page, expect

from app.http.auth import create_token
from tests.e2e.replicas import ReplicaProcess

# Fast part flushes and keep-alives, and a short stale threshold so that a replacement replica
# takes over a killed one's chat quickly.
REPLICA_ENV = {
    "CHATD_PART_FLUSH_INTERVAL_MS": "10",
    "CHATD_KEEPALIVE_INTERVAL_S": "2",
    "CHATD_STALE_THRESHOLD_S": "1.5",
    "CHATD_HEARTBEAT_INTERVAL_S": "0.5",
    "CHATD_ACQUIRE_POLL_INTERVAL_S": "0.5",
    "CHATD_SHUTDOWN_GRACE_S": "2",
}
SLOW_MODEL = "Slow echo"
# The slow echo streams one word per SLOW_WORD_DELAY_MS: slow enough to watch an answer grow,
# stop it or reload in the middle of it, whatever the machine's load.
SLOW_WORD_DELAY_MS = 120
CHAT_URL = re.compile(r".*#/chats/[0-9a-f-]{36}$")


def words(count: int, stem: str = "word") -> str:
    return " ".join(f"{stem}{index}" for index in range(count))


@dataclass
class Chatd:
    """One replica serving the page, and a pool on its database for setting things up."""

    log_dir: Path
    database_url: str
    pool: asyncpg.Pool
    replica: ReplicaProcess
    generation: int = 1
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.replica.url

    async def token(self, user: str, *, admin: bool = False) -> str:
        if user not in self.tokens:
            self.tokens[user] = await create_token(self.pool, user, admin=admin)
        return self.tokens[user]

    async def crash(self) -> None:
        """SIGKILL the replica: mid-stream, nothing is given back, connections just break."""
        self.replica.signal(signal.SIGKILL)
        await self.replica.wait_exit()

    async def replace(self) -> None:
        """A new replica at the dead one's address, as a process supervisor would restart it."""
        self.generation += 1
        self.replica = _replica(
            self.log_dir, self.database_url, f"replica{self.generation}", self.replica.port
        )
        self.replica.start()
        await self.replica.wait_healthy(timeout_s=60)


def _replica(log_dir: Path, database_url: str, name: str, port: int | None) -> ReplicaProcess:
    return ReplicaProcess(
        log_dir=log_dir,
        name=name,
        env={"DATABASE_URL": database_url} | REPLICA_ENV,
        port=port,
    )


@asynccontextmanager
async def running_chatd(log_dir: Path, database_url: str) -> AsyncIterator[Chatd]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    assert pool is not None
    replica = _replica(log_dir, database_url, "replica1", None)
    chatd = Chatd(log_dir, database_url, pool, replica)
    try:
        await pool.execute(
            "INSERT INTO chat_model_configs (provider, model, display_name, options)"
            " VALUES ('builtin', 'echo', $1, $2::jsonb)",
            SLOW_MODEL,
            json.dumps({"token_delay_ms": SLOW_WORD_DELAY_MS}),
        )
        replica.start()
        await replica.wait_healthy(timeout_s=60)
        yield chatd
    finally:
        chatd.replica.kill()
        await pool.close()


# --------------------------------------------------------------------------------------------
# The page.


def message_box(page: Page) -> Locator:
    return page.get_by_role("textbox", name="Message", exact=True)


def button(page: Page, name: str) -> Locator:
    return page.get_by_role("button", name=name, exact=True)


def answers(page: Page) -> Locator:
    """The assistant messages of the open chat (durable ones, not the answer in progress)."""
    return page.locator("#messages li.message.assistant:not(.live)")


def user_messages(page: Page) -> Locator:
    return page.locator("#messages li.message.user")


def live_answer(page: Page) -> Locator:
    return page.locator("#messages li.message.live")


async def log_in_with_token(page: Page, base_url: str, token: str) -> None:
    await page.goto(base_url + "/")
    await page.get_by_label("API token").fill(token)
    await button(page, "Log in").click()
    await expect(button(page, "New chat")).to_be_visible()


async def new_page(context: BrowserContext, *, record: bool = True) -> Page:
    page = await context.new_page()
    if record:
        await page.add_init_script(RECORDER)
    return page


async def send(page: Page, text: str) -> None:
    await message_box(page).fill(text)
    await message_box(page).press("Enter")
    await expect(message_box(page)).to_have_value("")


async def start_chat(page: Page, text: str, *, model: str | None = None) -> str:
    """A new chat with its first message, from the page; the chat's id."""
    await button(page, "New chat").click()
    if model is not None:
        await page.get_by_label("Model").select_option(label=model)
    await send(page, text)
    await expect(page).to_have_url(CHAT_URL)
    return page.url.rsplit("/", 1)[1]


async def wait_live_words(page: Page, count: int) -> str:
    """Wait until the answer in progress shows at least `count` words; its text then."""
    await page.wait_for_function(
        "count => { const n = document.querySelector('#messages li.live .content');"
        " return n !== null && n.textContent.trim().split(/\\s+/).length >= count; }",
        arg=count,
    )
    return str(await live_answer(page).locator(".content").text_content())


# Records, from the first paint, every text the answer in progress shows: what a user saw grow.
RECORDER = """
window.__liveTexts = [];
new MutationObserver(() => {
  const node = document.querySelector('#messages li.live .content');
  const text = node ? node.textContent : null;
  const seen = window.__liveTexts;
  if (text !== null && seen[seen.length - 1] !== text) {
    seen.push(text);
  }
}).observe(document, { childList: true, subtree: true, characterData: true });
"""


async def live_texts(page: Page) -> list[str]:
    texts: Any = await page.evaluate("window.__liveTexts")
    assert isinstance(texts, list)
    return [str(text) for text in texts]


async def api_status(page: Page, path: str) -> int:
    """The status of a GET the page itself makes (with its cookie)."""
    status: Any = await page.evaluate("path => fetch(path).then(r => r.status)", path)
    return int(status)
