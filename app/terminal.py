"""`chatd chat "text" [--chat ID]`: a terminal client of the HTTP API. It sends the message
(creating the chat unless --chat is given), streams the answer to stdout as it arrives (SSE),
shows tool calls and their results, shows retries and errors on stderr, and turns Ctrl-C into an
interrupt (a second Ctrl-C quits).

Client-side tools (docs/requires_action.md): a chat the client creates declares the built-in
`ask_user_question` (its definition is fetched from the server). When the chat waits for its
client (`action_required`), the client asks its user: a question with its choices, or, for any
other client tool of the chat, a JSON result; it reads the answers from stdin, posts them to
`tool-results` and keeps streaming the rest of the turn.

If the stream breaks (network, server restart, the client fell behind), it reconnects from the
last cursor it received, so nothing is printed twice and nothing is skipped.

Defaults: URL from --url, CHATD_URL, else http://CHATD_HOST:CHATD_PORT (127.0.0.1:8080); token
from --token, CHATD_TOKEN, else the local token `chatd serve` writes into the embedded
database's data directory (CHATD_DATA_DIR, `.chatd`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import aiohttp

from app.config import Settings, read_local_token

TERMINAL = ("waiting", "error")
# The built-in client tool this client answers (app/state/client_tools.py, served by the API).
ASK_USER_QUESTION = "ask_user_question"
RECONNECT_ATTEMPTS = 20
RECONNECT_BACKOFF_MAX_S = 5.0


class ClientError(Exception):
    """An answer the client cannot go on from (bad token, missing chat, ...)."""


# --------------------------------------------------------------------------------------------
# Server-Sent Events parsing (also used by the test suite).


@dataclass
class SseEvent:
    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SseParser:
    """Incremental SSE parsing per the HTML living standard: fields `event`, `data`, `id`;
    comment lines (keep-alives) are counted and otherwise ignored."""

    comments: int = 0
    _buffer: str = ""
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def feed(self, chunk: str) -> list[SseEvent]:
        self._buffer += chunk
        events: list[SseEvent] = []
        while True:
            newline = self._buffer.find("\n")
            if newline < 0:
                return events
            line = self._buffer[:newline].rstrip("\r")
            self._buffer = self._buffer[newline + 1 :]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = SseEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data, self._id = "", [], None
            return event
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None


async def iter_sse(
    response: aiohttp.ClientResponse, parser: SseParser | None = None
) -> AsyncIterator[SseEvent]:
    """The events of an SSE response as they arrive (chunks, not lines: a message event can be
    longer than aiohttp's line limit)."""
    parser = parser or SseParser()
    pending = b""
    async for chunk in response.content.iter_any():
        pending += chunk
        # Decode only up to the last complete UTF-8 sequence boundary (a newline is one).
        cut = pending.rfind(b"\n") + 1
        if not cut:
            continue
        text, pending = pending[:cut].decode("utf-8"), pending[cut:]
        for event in parser.feed(text):
            yield event


# --------------------------------------------------------------------------------------------
# The API calls the terminal client needs.


class ApiClient:
    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    async def _json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(
            method, self.url + path, json=body, headers=self.headers
        ) as response:
            payload = await response.json(content_type=None) if response.status != 204 else None
            if response.status >= 400:
                message = payload.get("message") if isinstance(payload, dict) else None
                detail = payload.get("detail") if isinstance(payload, dict) else None
                raise ClientError(
                    f"{method} {path}: {response.status} {message or response.reason}"
                    + (f" ({detail})" if detail else "")
                )
            return response.status, payload

    async def create_chat(
        self, text: str, tools: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"content": text}
        if tools:
            body["tools"] = tools
        _, chat = await self._json("POST", "/api/v1/chats", body)
        return dict(chat)

    async def ask_user_question_tool(self) -> dict[str, Any] | None:
        """The server's definition of ask_user_question; None from a server without one."""
        try:
            _, definition = await self._json("GET", "/api/v1/tools/ask_user_question")
        except ClientError as exc:
            if ": 404 " in str(exc):
                return None
            raise
        return dict(definition)

    async def post_tool_results(self, chat_id: str, results: list[dict[str, Any]]) -> None:
        await self._json("POST", f"/api/v1/chats/{chat_id}/tool-results", {"results": results})

    async def send(self, chat_id: str, text: str) -> tuple[int, dict[str, Any]]:
        status, body = await self._json(
            "POST", f"/api/v1/chats/{chat_id}/messages", {"content": text}
        )
        return status, dict(body)

    async def get_chat(self, chat_id: str) -> dict[str, Any]:
        _, chat = await self._json("GET", f"/api/v1/chats/{chat_id}")
        return dict(chat)

    async def last_message_id(self, chat_id: str) -> int:
        after = 0
        while True:
            _, page = await self._json(
                "GET", f"/api/v1/chats/{chat_id}/messages?after_id={after}&limit=1000"
            )
            if page["messages"]:
                after = page["messages"][-1]["id"]
            if page.get("next") is None:
                return after

    async def interrupt(self, chat_id: str) -> None:
        await self._json("POST", f"/api/v1/chats/{chat_id}/interrupt")

    @contextlib.asynccontextmanager
    async def stream(self, chat_id: str, cursor: str) -> AsyncIterator[aiohttp.ClientResponse]:
        async with self.session.get(
            f"{self.url}/api/v1/chats/{chat_id}/stream",
            headers=self.headers | {"Last-Event-ID": cursor, "Accept": "text/event-stream"},
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        ) as response:
            if response.status != 200:
                body = await response.text()
                raise ClientError(f"stream: {response.status} {body[:300]}")
            yield response


# --------------------------------------------------------------------------------------------
# Rendering.


@dataclass
class Renderer:
    out: TextIO
    err: TextIO
    color: bool = False
    _step_printed: bool = False
    _at_line_start: bool = True
    # What the live parts of the step in progress printed: when the step's message arrives,
    # whatever the stream never showed as a part (it was persisted, and its parts deleted,
    # before the stream read them) is printed from the message.
    _step_text: str = ""
    _step_calls: set[str] = field(default_factory=set)
    # Tool results shown as live parts: their tool message does not print them again.
    _results_shown: set[str] = field(default_factory=set)

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self._at_line_start = text.endswith("\n")

    def _end_line(self) -> None:
        if not self._at_line_start:
            self._write("\n")

    def note(self, text: str) -> None:
        self._end_line()
        self.err.write(text + "\n")
        self.err.flush()

    def part(self, part: dict[str, Any]) -> None:
        kind = part.get("type")
        if kind == "text":
            text = str(part.get("text", ""))
            self._write(text)
            self._step_text += text
            self._step_printed = True
        elif kind == "reasoning" and self.color:
            self._write(f"\x1b[2m{part.get('text', '')}\x1b[0m")
            self._step_printed = True
        elif kind == "tool_call":
            self._end_line()
            self._write(f"→ {part.get('name')}({json.dumps(part.get('args'))[:200]})\n")
            self._step_calls.add(str(part.get("id")))
            self._step_printed = True
        elif kind == "tool_result":
            self._tool_result(part)
            self._results_shown.add(str(part.get("tool_call_id")))

    def _tool_result(self, part: dict[str, Any]) -> None:
        self._end_line()
        result = json.dumps(part.get("result"))[:200]
        flag = " (error)" if part.get("is_error") else ""
        self._write(f"  ↳ {part.get('name')}{flag}: {result}\n")

    def message(self, message: dict[str, Any]) -> None:
        role = message.get("role")
        if role == "assistant":
            content = message.get("content", [])
            if not self._step_printed:  # joined after the step was streamed: print it whole
                for part in content:
                    self.part(part)
            else:
                self._print_unseen(content)
            self._end_line()
        elif role == "tool":
            for part in message.get("content", []):
                call_id = str(part.get("tool_call_id"))
                if call_id in self._results_shown:
                    self._results_shown.discard(call_id)  # shown live already
                else:
                    self._tool_result(part)
        elif role == "system" and any(
            part.get("type") == "compaction" for part in message.get("content", [])
        ):
            self.note("[earlier messages were summarized to save context]")
        self._forget_step()

    def _print_unseen(self, content: list[dict[str, Any]]) -> None:
        """The end of a step whose last live parts the stream skipped: the rest of its text and
        the tool calls not shown yet."""
        text = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
        if text.startswith(self._step_text):
            self._write(text[len(self._step_text) :])
        for part in content:
            if part.get("type") == "tool_call" and str(part.get("id")) not in self._step_calls:
                self.part(part)

    def _forget_step(self) -> None:
        self._step_printed = False
        self._step_text = ""
        self._step_calls = set()

    def void_step(self) -> None:
        self._end_line()
        self._forget_step()
        self._results_shown = set()

    def question(self, text: str) -> None:
        """A question to the user (stdout: it is part of the conversation)."""
        self._end_line()
        self._write(text if text.endswith("\n") else text + "\n")

    def prompt(self, text: str = "> ") -> None:
        self._end_line()
        self._write(text)

    def answered(self, *, echoed: bool) -> None:
        """The user answered a prompt; a terminal that echoed the answer is at a new line."""
        if echoed:
            self._at_line_start = True
        self._end_line()

    def finish(self) -> None:
        self._end_line()


# --------------------------------------------------------------------------------------------
# The conversation.


@dataclass
class Turn:
    """When the turn the user started is over: a terminal status newer than `baseline_version`
    (or equal to it when the chat was already terminal at the baseline), and, for a message
    that was queued, only once it left the queue."""

    chat_id: str
    baseline_status: str
    baseline_version: int
    cursor: str = "0:0"
    queued_id: int | None = None
    status: str = ""
    version: int = 0
    failed: bool = False

    def outcome(self) -> int | None:
        """The exit code once the turn is over: 0 (waiting) or 1 (error)."""
        if self.queued_id is not None or self.status not in TERMINAL:
            return None
        if self.version > self.baseline_version or self.baseline_status in TERMINAL:
            return 1 if self.status == "error" else 0
        return None


class LineSource(Protocol):
    """Where the answers to client tool calls come from: one line per call (None: no more).
    `echoed`: the line and its newline already show on the terminal (a tty echoes them)."""

    echoed: bool

    async def readline(self) -> str | None: ...


class StdinLines:
    """Lines of a blocking text stream (stdin) for asyncio, each read only when asked for, in a
    daemon thread: a read that is still blocked never holds the process up at exit. A question
    abandoned while its line is being read (the turn was stopped) leaves the read going; the
    line it gets answers the next question."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: asyncio.Future[str | None] | None = None
        try:
            self.echoed = stream.isatty()
        except (OSError, ValueError):
            self.echoed = False

    async def readline(self) -> str | None:
        if self._pending is None:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[str | None] = loop.create_future()
            self._pending = future
            threading.Thread(
                target=self._read, args=(loop, future), name="chatd-stdin", daemon=True
            ).start()
        line = await asyncio.shield(self._pending)
        self._pending = None
        return line

    def _read(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[str | None]) -> None:
        try:
            raw = self._stream.readline()
        except (OSError, ValueError):  # a closed or broken stdin: no more answers
            raw = ""
        line = raw.rstrip("\r\n") if raw else None

        def deliver() -> None:
            if not future.done():
                future.set_result(line)

        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(deliver)


def ask_user_question_result(args: dict[str, Any], line: str) -> dict[str, Any]:
    """The answer to ask_user_question: `{"answer": text}`; a number picks that choice."""
    choices = _choices(args)
    picked = line.strip()
    if choices and picked.isdigit() and 1 <= int(picked) <= len(choices):
        return {"answer": choices[int(picked) - 1]}
    return {"answer": line}


def _choices(args: dict[str, Any]) -> list[str]:
    choices = args.get("choices")
    if not isinstance(choices, list):
        return []
    return [str(choice) for choice in choices]


def typed_result(line: str) -> tuple[Any, bool]:
    """A result the user typed for a client tool: JSON if it parses, else the text itself; a
    line that starts with `!` is an error result (the rest is the message)."""
    if line.startswith("!"):
        return line[1:].strip(), True
    try:
        return json.loads(line), False
    except ValueError:
        return line, False


class Conversation:
    """One `chatd chat` invocation: send, then stream until the turn is over, answering the
    client tool calls of the chat from `answers` meanwhile."""

    def __init__(
        self, api: ApiClient, renderer: Renderer, answers: LineSource | None = None
    ) -> None:
        self.api = api
        self.renderer = renderer
        self.answers = answers
        self.turn: Turn | None = None
        self._interrupts: set[asyncio.Task[None]] = set()
        self._answering: asyncio.Task[None] | None = None
        self._answered: set[str] = set()  # ids of the calls answered (or being answered)

    def interrupt(self) -> None:
        """Ask the server to stop the run; the partial answer is kept and streamed to its end."""
        if self.turn is None:
            return
        self.renderer.note("[interrupting…]")
        task = asyncio.create_task(self._interrupt(self.turn.chat_id), name="interrupt")
        self._interrupts.add(task)
        task.add_done_callback(self._interrupts.discard)

    async def _interrupt(self, chat_id: str) -> None:
        try:
            await self.api.interrupt(chat_id)
        except (ClientError, aiohttp.ClientError) as exc:
            self.renderer.note(f"[interrupt failed: {exc}]")

    async def run(self, text: str, *, chat_id: str | None) -> int:
        self.turn = await self._send(text, chat_id)
        attempts = 0
        try:
            while True:
                try:
                    async with self.api.stream(self.turn.chat_id, self.turn.cursor) as response:
                        attempts = 0
                        async for event in iter_sse(response):
                            if event.id:
                                self.turn.cursor = event.id
                            self._follow_action(self.turn.chat_id, event)
                            outcome = _apply(self.turn, event, self.renderer)
                            if outcome is not None:
                                return outcome
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                    self.renderer.note(f"[stream broken: {exc.__class__.__name__}; resuming]")
                attempts += 1
                if attempts > RECONNECT_ATTEMPTS:
                    raise ClientError("the stream keeps failing; giving up")
                await asyncio.sleep(min(0.05 * 2**attempts, RECONNECT_BACKOFF_MAX_S))
        finally:
            self._stop_answering()
            if self._answering is not None:
                await asyncio.wait({self._answering})
            self.renderer.finish()
            if self._interrupts:
                await asyncio.wait(set(self._interrupts))

    # --- client tool calls ------------------------------------------------------------------

    def _follow_action(self, chat_id: str, event: SseEvent) -> None:
        """`action_required`: answer the calls (once each, however often a reconnect replays
        the event). A status other than requires_action: the calls were settled otherwise (a
        Stop, the time-out, another client's answer); stop asking."""
        if event.event not in ("action_required", "status"):
            return
        data = event.json()
        if data.get("type") == "status":
            if data.get("status") != "requires_action":
                self._stop_answering()
            return
        calls = [c for c in data.get("pending_tool_calls") or [] if isinstance(c, dict)]
        ids = {str(call.get("id")) for call in calls}
        if not calls or ids <= self._answered:
            return
        self._stop_answering()
        self._answered |= ids
        self._answering = asyncio.create_task(self._answer(chat_id, calls), name="answer")

    def _stop_answering(self) -> None:
        if self._answering is not None and not self._answering.done():
            self._answering.cancel()

    async def _answer(self, chat_id: str, calls: list[dict[str, Any]]) -> None:
        try:
            if self.answers is None:
                names = ", ".join(str(call.get("name")) for call in calls)
                self.renderer.note(
                    f"[the model called client tools ({names}); this client cannot answer them]"
                )
                return
            results = [await self._answer_call(self.answers, call) for call in calls]
            await self.api.post_tool_results(chat_id, results)
        except (ClientError, aiohttp.ClientError) as exc:
            self.renderer.note(f"[the answer was not taken: {exc}]")

    async def _answer_call(self, answers: LineSource, call: dict[str, Any]) -> dict[str, Any]:
        name = str(call.get("name"))
        args = call.get("args") if isinstance(call.get("args"), dict) else {}
        assert isinstance(args, dict)
        if name == ASK_USER_QUESTION:
            self.renderer.question(f"? {args.get('question', '')}")
            for number, choice in enumerate(_choices(args), start=1):
                self.renderer.question(f"  {number}. {choice}")
        else:
            self.renderer.question(
                f"? {name}({json.dumps(args)[:200]}) needs a result from you: JSON or text"
                " (start with ! for an error)"
            )
        self.renderer.prompt()
        line = await answers.readline()
        self.renderer.answered(echoed=answers.echoed and line is not None)
        result: dict[str, Any] = {"tool_call_id": call.get("id")}
        if line is None:
            return result | {"result": "the user gave no answer (end of input)", "is_error": True}
        if name == ASK_USER_QUESTION:
            return result | {"result": ask_user_question_result(args, line)}
        value, is_error = typed_result(line)
        return result | {"result": value, "is_error": is_error}

    async def _send(self, text: str, chat_id: str | None) -> Turn:
        if chat_id is None:
            # A chat this client creates can ask its user questions. A chat it continues keeps
            # the tools it has (its client tools would be replaced by the ones sent).
            ask = await self.api.ask_user_question_tool() if self.answers is not None else None
            chat = await self.api.create_chat(text, tools=[ask] if ask is not None else None)
            self.renderer.note(f"chat {chat['id']}")
            return Turn(chat["id"], chat["status"], chat["version"])
        status, body = await self.api.send(chat_id, text)
        if status == 202:
            queued = body["queued"]
            self.renderer.note(f"[queued as #{queued['id']}: the chat is busy]")
            last = await self.api.last_message_id(chat_id)
            chat = await self.api.get_chat(chat_id)
            turn = Turn(chat_id, chat["status"], chat["version"], cursor=f"{last}:0")
            turn.queued_id = queued["id"]
            return turn
        chat = await self.api.get_chat(chat_id)
        return Turn(chat_id, chat["status"], chat["version"], cursor=f"{body['message']['id']}:0")


def _apply(turn: Turn, event: SseEvent, renderer: Renderer) -> int | None:  # noqa: PLR0911, PLR0912  one branch per stream event type
    data = event.json()
    kind = data.get("type")
    if turn.failed and kind != "error":
        return 1
    if kind == "message_part":
        renderer.part(data.get("part") or {})
    elif kind == "message":
        message = data["message"]
        if message.get("role") != "user":
            renderer.message(message)
    elif kind == "retry":
        renderer.void_step()
        delay_s = (data.get("delay_ms") or 0) / 1000
        renderer.note(
            f"[retry {data.get('attempt')} in {delay_s:.1f}s: {data.get('kind')}"
            f" from {data.get('provider')}: {data.get('error')}]"
        )
    elif kind == "history_reset":
        renderer.void_step()
        if data.get("reason") == "edit":
            renderer.note("[the history was edited]")
    elif kind == "queue":
        if turn.queued_id is not None and all(
            item.get("id") != turn.queued_id for item in data.get("queued", [])
        ):
            turn.queued_id = None  # our message left the queue: its turn has started
            return turn.outcome()
    elif kind == "status":
        turn.status, turn.version = data["status"], data["version"]
        outcome = turn.outcome()
        if outcome == 1:
            turn.failed = True  # the `error` event that says why comes right after
            return None
        return outcome
    elif kind == "error":
        if data.get("kind") in ("resync", "shutdown", "unavailable"):
            renderer.note(f"[{data.get('message')}]")  # the stream ends; we resume
            return None
        provider = f", {data['provider']}" if data.get("provider") else ""
        code = f" {data['status_code']}" if data.get("status_code") else ""
        renderer.note(f"error: {data.get('message')} ({data.get('kind')}{provider}{code})")
        if turn.failed:
            return 1
    return None


def _default_url() -> str:
    url = os.environ.get("CHATD_URL")
    if url:
        return url
    defaults = Settings()
    host = os.environ.get("CHATD_HOST", defaults.host)
    port = os.environ.get("CHATD_PORT", str(defaults.port))
    return f"http://{host}:{port}"


def _default_token() -> str | None:
    token = os.environ.get("CHATD_TOKEN")
    if token:
        return token
    return read_local_token(Settings.from_env().data_dir)


def run_chat(text: str, *, chat_id: str | None, url: str | None, token: str | None) -> int:
    """The `chatd chat` command."""
    token = token or _default_token()
    if not token:
        print(
            "chatd chat: no token. Pass --token, set CHATD_TOKEN, run `chatd token create USER`,"
            " or start `chatd serve` with the embedded database (it writes a local token).",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_run_chat(text, chat_id=chat_id, url=url or _default_url(), token=token))


async def _run_chat(text: str, *, chat_id: str | None, url: str, token: str) -> int:
    renderer = Renderer(out=sys.stdout, err=sys.stderr, color=sys.stdout.isatty())
    loop = asyncio.get_running_loop()
    quit_requested = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        conversation = Conversation(
            ApiClient(session, url, token), renderer, answers=StdinLines(sys.stdin)
        )
        presses = 0

        def on_sigint() -> None:
            # First Ctrl-C: interrupt the run and show the rest of it. Second: quit at once.
            nonlocal presses
            presses += 1
            if presses == 1 and conversation.turn is not None:
                conversation.interrupt()
            else:
                quit_requested.set()

        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        running = asyncio.create_task(conversation.run(text, chat_id=chat_id), name="chat")
        quitting = asyncio.create_task(quit_requested.wait(), name="quit")
        try:
            await asyncio.wait({running, quitting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signal.SIGINT)
            quitting.cancel()
            if not running.done():
                running.cancel()
            await asyncio.wait({running, quitting})
        if running.cancelled():
            renderer.note("[quit]")
            return 130
        try:
            return running.result()
        except ClientError as exc:
            renderer.note(f"chatd chat: {exc}")
            return 1
        except aiohttp.ClientConnectionError as exc:
            renderer.note(f"chatd chat: cannot reach {url}: {exc}")
            return 1
