"""The Vercel AI SDK's routes (docs/api.md, "Vercel AI SDK"): `useChat` with chatd as its
durable backend, unchanged.

`POST /api/v1/ai-sdk/chats` takes `DefaultChatTransport`'s body, sends the last user message
(creating the chat under the id the client chose) or answers the last one again
(`regenerate-message`), and answers with the turn's UI message stream. `GET …/{id}/stream` is
what `useChat({resume: true})` asks on mount: 204 when the chat is not busy, otherwise the
answer in progress from its start, then live, on any replica.

Both are chatd's own stream translated (app/stream/ui_message.py): the endpoint joins the
chat's hub on this replica from the cursor of the user message the turn answers, so a replay
and the live answer are one sequence, as for `GET …/stream`. A message sent while the chat is
busy is queued, as `POST …/messages` does; its stream waits until the queue hands it to the
model (`QueuedMessageWatch`) and then streams that turn.

A Stop (`POST …/interrupt`) does not show in the chat's stream (the run writes the partial
answer and the chat goes `waiting`, as at any end of a turn), so the endpoint also listens to
the chat's channel for the Stop mark of the row, to end the stream with `abort`.

When this replica cannot go on (it is shutting down, or the chat's hub failed) the connection is
dropped without `[DONE]`: the AI SDK takes that for a network disconnect and can resume, on
any replica."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from app.db.listener import Resync, Subscription
from app.errors import NotFound, ValidationFailed
from app.http.models import AiSdkChatRequest
from app.http.routing import Call
from app.http.stream_endpoints import DISCONNECT_CHECK_INTERVAL_S, STALLED_WRITE_KEEPALIVES
from app.log import get_logger
from app.state import chats
from app.state.model import MAX_PARTS, MAX_TEXT_CHARS, NON_BLANK, UserLimits
from app.stream.protocol import SSE_KEEPALIVE, StreamCursor
from app.stream.subscriber import StreamClient
from app.stream.ui_message import (
    CONNECTION_NOTICES,
    DONE,
    STREAM_HEADERS,
    AnswerTranslator,
    Chunk,
    QueuedMessageWatch,
    encode,
)

log = get_logger(__name__)

# A client that fell behind (its hub queue overflowed) is joined again from its cursor, at most
# this many times per response; after that the connection is dropped and the client resumes.
MAX_REJOINS = 3
BUSY = ("pending", "running")


async def send_messages(call: Call) -> web.StreamResponse:
    body = await call.body(AiSdkChatRequest)
    content = _last_user_content(body) if body.trigger == "submit-message" else None
    chat_id = body.id
    limits = UserLimits(
        max_chats=call.settings.max_chats_per_user,
        max_pending_chats=call.settings.max_pending_chats_per_user,
    )
    with _stream_slot(call):  # 429 before anything is sent, like the other streams
        async with call.listener.subscribe(f"chat:{chat_id}") as notices:
            if content is None:
                message = await chats.regenerate(call.pool, call.owner, chat_id, limits=limits)
                return await _UIStream(call, chat_id, notices).serve_answer(message.id)
            # The turn before this message: a queued message is looked for from there.
            before = await chats.last_user_message(call.pool, call.owner, chat_id)
            result = await chats.send_or_create(
                call.pool,
                call.owner,
                chat_id,
                content,
                queue_limit=call.settings.queue_limit,
                limits=limits,
                model_config_id=body.model_config_id,
                client_type="ui",
            )
            stream = _UIStream(call, chat_id, notices)
            if result.message is not None:
                return await stream.serve_answer(result.message.id)
            assert result.queued is not None
            watch = QueuedMessageWatch(result.queued.id, result.queued.content)
            cursor = StreamCursor(before.id if before is not None else 0, 0)
            return await stream.serve_queued(watch, cursor)


async def resume_stream(call: Call) -> web.StreamResponse:
    chat_id = call.path_uuid("id")
    chat = await chats.get_chat(call.pool, call.owner, chat_id)  # 404 unless it is the caller's
    if chat.status not in BUSY:
        return web.Response(status=204)
    with _stream_slot(call):
        async with call.listener.subscribe(f"chat:{chat_id}") as notices:
            message = await chats.last_user_message(call.pool, call.owner, chat_id)
            if message is None:
                return web.Response(status=204)
            return await _UIStream(call, chat_id, notices).serve_answer(message.id)


def _stream_slot(call: Call) -> contextlib.AbstractContextManager[None]:
    return call.hubs.slots.hold(call.me.id, call.settings.max_streams_per_user)


def _invalid(field: str, message: str, detail: str) -> ValidationFailed:
    return ValidationFailed(message, validations=[{"field": field, "detail": detail}])


def _last_user_content(body: AiSdkChatRequest) -> list[dict[str, Any]]:
    """The text parts of the last user message: chatd owns the history, so the rest of
    `messages` is what the client has, not what it asks."""
    index = next(
        (i for i in range(len(body.messages) - 1, -1, -1) if body.messages[i].role == "user"),
        None,
    )
    if index is None:
        raise _invalid("messages", "no user message to send", "expected a message with role user")
    parts: list[dict[str, Any]] = []
    chars = 0
    for number, part in enumerate(body.messages[index].parts):
        field = f"messages.{index}.parts.{number}"
        if part.type == "file":
            raise _invalid(field, "chatd takes text only", "file parts are not supported")
        if part.type != "text":
            continue  # step-start, data, source, reasoning, tool parts: not a user's words
        if not isinstance(part.text, str):
            raise _invalid(f"{field}.text", "a text part needs a string text", "expected string")
        chars += len(part.text)
        parts.append({"type": "text", "text": part.text})
    field = f"messages.{index}.parts"
    if not any(NON_BLANK.search(part["text"]) for part in parts):
        raise _invalid(field, "the last user message has no text", "expected a non-blank text part")
    if len(parts) > MAX_PARTS:
        raise _invalid(field, f"at most {MAX_PARTS} text parts", "too many text parts")
    if chars > MAX_TEXT_CHARS:
        raise _invalid(field, f"at most {MAX_TEXT_CHARS} characters", "too long")
    return parts


class _Dropped(Exception):
    """The stream cannot go on from this replica: the connection is dropped (no `[DONE]`) so
    that the client resumes."""


class _UIStream:
    """One UI message stream response: the SSE writer, the chat's hub joined from a cursor,
    and the Stop marks of the chat's notifications."""

    def __init__(self, call: Call, chat_id: uuid.UUID, notices: Subscription) -> None:
        self.call = call
        self.chat_id = chat_id
        self.notices = notices
        self.response = web.StreamResponse(headers=STREAM_HEADERS)
        self._loop = asyncio.get_running_loop()
        self._last_write = self._loop.time()
        self._translator: AnswerTranslator | None = None
        self._base_version = 0  # Stop marks at or below it were in the row read at the start

    async def serve_answer(self, user_message_id: int) -> web.StreamResponse:
        await self._prepare()
        await self._run(lambda: self._answer(user_message_id))
        return self.response

    async def serve_queued(
        self, watch: QueuedMessageWatch, cursor: StreamCursor
    ) -> web.StreamResponse:
        async def queued() -> None:
            def feed(event: str, data: Mapping[str, Any]) -> list[Chunk]:
                watch.feed(event, data)
                return []

            await self._follow(cursor, feed, watch.drained, lambda: watch.done)
            if watch.found is not None:
                await self._answer(watch.found)
            elif watch.ended is not None:
                await self._write_chunks([{"type": "start"}, watch.ended])

        await self._prepare()
        await self._run(queued)
        return self.response

    async def _prepare(self) -> None:
        await self.response.prepare(self.call.request)
        self._last_write = self._loop.time()

    async def _run(self, body: Callable[[], Awaitable[None]]) -> None:
        try:
            await body()
            if not _gone(self.call.request):
                await self._write(DONE)
        except _Dropped:
            if self.call.request.transport is not None:
                self.call.request.transport.abort()
        except ConnectionResetError:
            pass  # the client went away; the turn goes on without it

    async def _answer(self, user_message_id: int) -> None:
        translator = AnswerTranslator(user_message_id)
        # Notices so far are of earlier turns, or in the row read now: a Stop mark on the row
        # is this turn's (every transition that starts a turn clears the mark).
        self._discard_notices()
        try:
            chat = await chats.get_chat(self.call.pool, self.call.owner, self.chat_id)
        except NotFound:
            await self._write_chunks([{"type": "error", "errorText": "the chat was deleted"}])
            return
        self._base_version = chat.version
        self._translator = translator
        if chat.interrupt_requested:
            translator.note_interrupt()
        await self._write_chunks(translator.start())
        await self._follow(
            StreamCursor(user_message_id, 0), translator.feed, _nothing, lambda: translator.done
        )

    async def _follow(
        self,
        cursor: StreamCursor,
        feed: Callable[[str, Mapping[str, Any]], list[Chunk]],
        drained: Callable[[], None],
        done: Callable[[], bool],
    ) -> None:
        """Feed the chat's events from `cursor` until `done()`. A client that fell behind is
        joined again from its cursor; raises _Dropped when this replica cannot go on."""
        for _attempt in range(MAX_REJOINS + 1):
            async with self.call.hubs.watch(self.chat_id, cursor) as client:
                notice = await self._feed(client, feed, drained, done)
            if notice is None:
                return
            kind, cursor = notice
            if kind != "resync":
                break
        raise _Dropped

    async def _feed(
        self,
        client: StreamClient,
        feed: Callable[[str, Mapping[str, Any]], list[Chunk]],
        drained: Callable[[], None],
        done: Callable[[], bool],
    ) -> tuple[str, StreamCursor] | None:
        """The writer loop of one hub client; a connection notice and its cursor when the hub
        ended it, None when done (or the client is gone: the next write says so)."""
        keepalive_s = self.call.settings.keepalive_interval_s
        check_s = min(keepalive_s, DISCONNECT_CHECK_INTERVAL_S)
        while not done():
            frame = await client.next(check_s)
            await self._take_notices()
            if frame is None:
                if client.closed or _gone(self.call.request):
                    raise ConnectionResetError("the client went away")
                if self._loop.time() - self._last_write >= keepalive_s:
                    await self._write(SSE_KEEPALIVE)
                continue
            kind = frame.data.get("kind")
            if frame.final and frame.event == "error" and kind in CONNECTION_NOTICES:
                return str(kind), frame.cursor or client.delivered
            chunks = feed(frame.event, frame.data)
            if client.queued == 0:
                drained()  # every event of the batch was fed
            await self._write_chunks(chunks)
        return None

    def _discard_notices(self) -> None:
        while self.notices.get_nowait() is not None:
            pass

    async def _take_notices(self) -> None:
        """Note a Stop mark of the chat's row that came after the turn's start."""
        translator = self._translator
        if translator is None:
            self._discard_notices()
            return
        reread = False
        while (event := self.notices.get_nowait()) is not None:
            if isinstance(event, Resync):
                reread = True  # notices may have been lost: the row says
                continue
            try:
                notice = json.loads(event.payload)
                marked = notice.get("type") == "chat" and notice.get("interrupt_requested")
                newer = int(notice.get("version") or 0) > self._base_version
            except (ValueError, TypeError, AttributeError):
                continue
            if marked and newer:
                translator.note_interrupt()
        if reread:
            with contextlib.suppress(NotFound):  # deleted: the stream says so
                chat = await chats.get_chat(self.call.pool, self.call.owner, self.chat_id)
                if chat.interrupt_requested:
                    translator.note_interrupt()

    async def _write_chunks(self, chunks: list[Chunk]) -> None:
        if chunks:
            await self._write(b"".join(encode(chunk) for chunk in chunks))

    async def _write(self, data: bytes) -> None:
        """One write with a stall deadline, as the chat stream's: a client that stopped reading
        is disconnected."""
        request = self.call.request
        deadline_s = self.call.settings.keepalive_interval_s * STALLED_WRITE_KEEPALIVES
        try:
            async with asyncio.timeout(deadline_s):
                await self.response.write(data)
        except TimeoutError:
            log.info("ai_sdk.client_stalled", chat_id=self.chat_id, deadline_s=deadline_s)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("client stopped reading") from None
        self._last_write = self._loop.time()


def _nothing() -> None:
    return None


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
