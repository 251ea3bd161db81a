"""An SSE client that never gives up on a chat: it reconnects after every disconnect (end of
stream, socket error, a 5xx while the database is down, a final `error` event) with
`Last-Event-ID` set to the last cursor it received, rotating over the replicas it was given, and
assembles the chat the way docs/api.md ("How a client assembles the chat") tells clients to:
messages by id; live parts of the step in progress appended; `retry` clears them; `history_reset`
clears them and drops messages from `from_message_id` on; a `message` replaces them.

It also keeps what a test needs to judge the stream: every event with its arrival time and
connection number, the statuses, and whether the live text ever stopped being a prefix of the
expected answer (a gap or a duplicate in the live parts shows there, even when the final
`message` later papers over it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from app.terminal import SseEvent, iter_sse

# Without a byte for this long (keep-alives included) the connection counts as dead.
DEFAULT_SILENCE_S = 10.0
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0


@dataclass
class ReceivedEvent:
    event: SseEvent
    data: dict[str, Any]
    at: float  # loop time of arrival
    connection: int  # 1 for the first connection, 2 for the first reconnection, ...


@dataclass
class ChatView:
    """A client's view of a chat, assembled from its events."""

    messages: dict[int, dict[str, Any]] = field(default_factory=dict)
    live: list[str] = field(default_factory=list)
    status: str | None = None
    duplicates: list[int] = field(default_factory=list)  # message ids delivered twice

    def apply(self, data: dict[str, Any]) -> None:
        kind = data["type"]
        if kind == "message":
            message = data["message"]
            if message["id"] in self.messages:
                self.duplicates.append(message["id"])
            self.messages[message["id"]] = message
            self.live = []
        elif kind == "message_part":
            self.live.append(data["part"].get("text", ""))
        elif kind == "retry":
            self.live = []
        elif kind == "history_reset":
            self.live = []
            for message_id in [m for m in self.messages if m >= data["from_message_id"]]:
                del self.messages[message_id]
        elif kind == "status":
            self.status = data["status"]

    @property
    def live_text(self) -> str:
        return "".join(self.live)

    def texts(self, role: str) -> list[str]:
        """The text of every message of `role`, in id order."""
        return [
            message_text(self.messages[m])
            for m in sorted(self.messages)
            if self.messages[m]["role"] == role
        ]


def message_text(message: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in message["content"])


def turn_ended(view: ChatView) -> bool:
    """The default end: the chat is idle (or failed) and its answer arrived."""
    return view.status == "error" or (view.status == "waiting" and bool(view.texts("assistant")))


class ResumingSseClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_urls: list[str],
        chat_id: str,
        headers: dict[str, str],
        *,
        expected_answer: str | None = None,
        silence_s: float = DEFAULT_SILENCE_S,
        first_url: int = 0,
    ) -> None:
        self.session = session
        self.base_urls = base_urls
        self.chat_id = chat_id
        self.headers = headers
        self.expected_answer = expected_answer
        self.silence_s = silence_s
        self._next_url = first_url
        self.view = ChatView()
        self.events: list[ReceivedEvent] = []
        self.cursor: str | None = None
        self.connections = 0  # connections that answered 200
        self.attempts = 0  # every try, failed ones included
        self.disconnects: list[str] = []  # why each connection ended
        self.prefix_violations: list[str] = []  # live texts that are not a prefix of the answer
        self._response: aiohttp.ClientResponse | None = None

    def drop_connection(self) -> None:
        """Close the current connection, as a flaky network or a closed laptop would; the client
        resumes from its cursor on the next replica."""
        if self._response is not None:
            self._response.close()

    def transcript(self) -> str:
        """One line per event (connection, time, cursor, type, gist), and why connections ended:
        for failure reports."""
        lines = []
        for received in self.events:
            data = received.data
            gist = {
                "message_part": lambda d: f"part {d['part_id']} {d['part'].get('text', '')!r}",
                "message": lambda d: f"message {d['message']['id']} {d['message']['role']}",
                "status": lambda d: f"status {d['status']}",
                "history_reset": lambda d: f"history_reset {d['from_message_id']} {d['reason']}",
                "error": lambda d: f"error {d.get('kind')} {d.get('message')}",
            }.get(data["type"], lambda d: str(d["type"]))(data)
            lines.append(f"#{received.connection} {received.at:.3f} id={received.event.id} {gist}")
        lines.append(f"disconnects: {self.disconnects}")
        return "\n".join(lines)

    def parts_after(self, moment: float) -> int:
        return sum(1 for e in self.events if e.data["type"] == "message_part" and e.at > moment)

    async def run(
        self, until: Callable[[ChatView], bool] = turn_ended, *, timeout_s: float = 60.0
    ) -> ChatView:
        """Follow the chat, reconnecting as often as needed, until `until(view)` holds."""
        backoff = BACKOFF_FIRST_S
        async with asyncio.timeout(timeout_s):
            while True:
                if await self._one_connection(until):
                    return self.view
                await asyncio.sleep(backoff)  # a reconnect backoff, not a synchronization
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _one_connection(self, until: Callable[[ChatView], bool]) -> bool:
        """One connection; True once `until` holds, False when the connection ended first."""
        url = self.base_urls[self._next_url % len(self.base_urls)]
        self._next_url += 1
        headers = dict(self.headers)
        if self.cursor is not None:
            headers["Last-Event-ID"] = self.cursor
        self.attempts += 1
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.silence_s)
        try:
            async with self.session.get(
                f"{url}/api/v1/chats/{self.chat_id}/stream", headers=headers, timeout=timeout
            ) as response:
                if response.status != 200:
                    body = await response.text()
                    if response.status < 500:
                        raise AssertionError(f"stream answered {response.status}: {body}")
                    self.disconnects.append(f"{response.status} {body[:200]}")
                    return False
                self.connections += 1
                self._response = response
                try:
                    async for event in iter_sse(response):
                        if self._receive(event) and until(self.view):
                            return True
                finally:
                    self._response = None
                self.disconnects.append("end of stream")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.disconnects.append(repr(exc)[:200])
        return False

    def _receive(self, event: SseEvent) -> bool:
        if not event.data:
            return False
        data = event.json()
        if event.id:
            self.cursor = event.id
        self.events.append(
            ReceivedEvent(event, data, asyncio.get_running_loop().time(), self.connections)
        )
        self.view.apply(data)
        if data["type"] == "error" and data.get("kind") in ("resync", "shutdown", "unavailable"):
            self.disconnects.append(f"error event {data.get('kind')}")
        if (
            data["type"] == "message_part"
            and self.expected_answer is not None
            and not self.expected_answer.startswith(self.view.live_text)
        ):
            self.prefix_violations.append(self.view.live_text[-200:])
        return True
