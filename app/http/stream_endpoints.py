"""Stream endpoints: a chat's events over SSE and WebSocket (both fed by the chat's hub on this
replica, app/stream/), and the caller's chat-list changes over SSE.

The ownership check runs before anything is streamed: another user's chat answers 404 like a
missing one; a user with `max_streams_per_user` streams open on this replica gets 429. Errors
before the stream starts are ordinary JSON errors; once it has started, the stream ends with a
final `error` event that says why and from which cursor to resume."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from app.db.listener import Notice, Resync, Subscription
from app.http import keys
from app.http.models import StreamQuery
from app.http.routing import Call
from app.log import get_logger
from app.state import chats
from app.stream.owner_watch import owner_channel, owner_frame
from app.stream.protocol import SSE_KEEPALIVE, Frame, StreamCursor
from app.stream.subscriber import StreamClient

log = get_logger(__name__)

# How often an idle SSE connection checks that its client is still there (aiohttp does not
# cancel a handler whose client went away): bounds how long a gone client's state lingers.
DISCONNECT_CHECK_INTERVAL_S = 1.0
# A write that cannot complete within this many keep-alive intervals means the client stopped
# reading: its connection is aborted (its queue already overflowed or soon will; the kernel's
# socket buffers are full). The final `resync` frame reaches a client that is merely slow.
STALLED_WRITE_KEEPALIVES = 2.0
WS_MAX_INCOMING_BYTES = 4096


def _cursor(call: Call, *, header: bool) -> StreamCursor:
    """`Last-Event-ID` (an SSE client's automatic resume) wins over `?after=`."""
    after = call.query(StreamQuery).after
    last_event_id = call.request.headers.get("Last-Event-ID") if header else None
    if last_event_id:
        return StreamCursor.parse(last_event_id[:100], field="Last-Event-ID")
    return StreamCursor.parse(after) if after else StreamCursor()


def _sse_response() -> web.StreamResponse:
    return web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # tell reverse proxies not to buffer the stream
        }
    )


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _fits(transport: asyncio.BaseTransport | None, size: int) -> bool:
    """Whether `size` more bytes stay within the socket buffer's limit (the high-water mark at
    which the transport pauses the writer): a write that fits cannot wait for the client."""
    if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
        return False
    return transport.get_write_buffer_size() + size <= transport.get_write_buffer_limits()[1]


async def _write(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    """One SSE write; when the socket's buffer is full, a wait for the client to take it, with
    a stall deadline: a stalled client is disconnected. A write that fits in the buffer cannot
    stall, and goes without a timer (the common case: one per batch of frames)."""
    if _fits(request.transport, len(data)):
        await response.write(data)
        return
    deadline_s = request.app[keys.SETTINGS].keepalive_interval_s * STALLED_WRITE_KEEPALIVES
    try:
        async with asyncio.timeout(deadline_s):
            await response.write(data)
            if request.protocol.writing_paused:
                # Back-pressure: nothing more is written to a client that does not read (its
                # frames queue, bounded, meanwhile), and one that stopped reading is dropped.
                await request.writer.drain()
    except TimeoutError:
        log.info("stream.client_stalled", path=request.path, deadline_s=deadline_s)
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("client stopped reading") from None


class _SseSink:
    """Writes a batch of live frames straight to the socket, synchronously, from the hub's task
    (StreamClient.sink): no wake-up of the connection's writer per batch. Only while the socket
    buffer has room (a slow client's frames queue instead, and its writer applies the stall
    deadline), and only once the writer has written the response's first bytes (the headers
    are surely out). The body framing is the response's: HTTP/1.1 chunks (the transfer
    encoding aiohttp chose for a response without a length) or raw bytes (HTTP/1.0)."""

    __slots__ = ("_chunked", "_loop", "_transport", "last_write")

    def __init__(
        self, transport: asyncio.WriteTransport, response: web.StreamResponse, last_write: float
    ) -> None:
        self._transport = transport
        self._chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
        self._loop = asyncio.get_running_loop()
        self.last_write = last_write

    def __call__(self, frames: list[Frame]) -> bool:
        if len(frames) == 1:
            data = frames[0].sse_chunk() if self._chunked else frames[0].sse()
        else:
            data = b"".join(frame.sse() for frame in frames)
            if self._chunked:
                data = b"%x\r\n%b\r\n" % (len(data), data)
        transport = self._transport
        # _fits without its type check (the transport is a WriteTransport, checked once).
        if (
            transport.is_closing()
            or transport.get_write_buffer_size() + len(data)
            > transport.get_write_buffer_limits()[1]
        ):
            return False
        transport.write(data)
        self.last_write = self._loop.time()
        return True


async def chat_stream(call: Call) -> web.StreamResponse:
    chat_id = call.path_uuid("id")
    cursor = _cursor(call, header=True)
    await chats.get_chat(call.pool, call.owner, chat_id)  # 404 unless it is the caller's
    with _stream_slot(call):
        response = _sse_response()
        await response.prepare(call.request)
        async with call.hubs.watch(chat_id, cursor) as client:
            with contextlib.suppress(ConnectionResetError):
                await _send_sse(call, response, client)
    return response


def _stream_slot(call: Call) -> contextlib.AbstractContextManager[None]:
    """One of the caller's `max_streams_per_user` open streams on this replica (SSE, WebSocket
    and the chat-list watch alike); 429 `streams_per_user` before anything is streamed."""
    return call.hubs.slots.hold(call.me.id, call.settings.max_streams_per_user)


async def _send_sse(call: Call, response: web.StreamResponse, client: StreamClient) -> None:
    sink: _SseSink | None = None

    def written(last_write: float) -> float:
        """After a write of the writer: live frames may now go straight to the socket."""
        nonlocal sink
        transport = call.request.transport
        if sink is None and isinstance(transport, asyncio.WriteTransport):
            sink = _SseSink(transport, response, last_write)
            client.sink = sink
        return sink.last_write if sink is not None else last_write

    try:
        await _write_sse_frames(call, response, client.take, lambda: client.closed, written)
    finally:
        client.sink = None


async def _write_sse_frames(
    call: Call,
    response: web.StreamResponse,
    next_frames: Callable[[float], Awaitable[list[Frame]]],
    finished: Callable[[], bool],
    written: Callable[[float], float] = lambda last_write: last_write,
) -> None:
    """The SSE writer loop both SSE endpoints share: write what `next_frames` gives (everything
    queued, in one write), and a keep-alive comment when nothing was written for
    `keepalive_interval_s`; stop after a final frame, or when nothing came and the source is
    `finished()` or the client is gone (checked every DISCONNECT_CHECK_INTERVAL_S at most).
    `written` is told of each write and answers the time of the connection's last write (frames
    may also be written without this loop: `_SseSink`)."""
    loop = asyncio.get_running_loop()
    keepalive_s = call.settings.keepalive_interval_s
    check_s = min(keepalive_s, DISCONNECT_CHECK_INTERVAL_S)
    last_write = loop.time()
    while True:
        frames = await next_frames(check_s)
        if not frames:
            if finished() or _gone(call.request):
                return
            last_write = written(last_write)
            if loop.time() - last_write >= keepalive_s:
                await _write(call.request, response, SSE_KEEPALIVE)
                last_write = written(loop.time())
            continue
        data = frames[0].sse() if len(frames) == 1 else b"".join(f.sse() for f in frames)
        await _write(call.request, response, data)
        if frames[-1].final:
            return
        last_write = written(loop.time())


async def chat_websocket(call: Call) -> web.StreamResponse:
    chat_id = call.path_uuid("id")
    cursor = _cursor(call, header=False)
    await chats.get_chat(call.pool, call.owner, chat_id)
    with _stream_slot(call):
        ws = web.WebSocketResponse(
            heartbeat=call.settings.keepalive_interval_s, max_msg_size=WS_MAX_INCOMING_BYTES
        )
        await ws.prepare(call.request)
        sockets = call.request.app[keys.WEBSOCKETS]
        sockets.add(ws)
        try:
            async with call.hubs.watch(chat_id, cursor) as client:
                reader = asyncio.create_task(
                    _drain_incoming(ws, client), name=f"ws-reader:{chat_id}"
                )
                try:
                    await _send_ws(call.request, ws, client, call.settings.keepalive_interval_s)
                finally:
                    reader.cancel()
                    await asyncio.wait([reader])
        finally:
            sockets.discard(ws)
            if not ws.closed:
                await ws.close()
    return ws


async def _drain_incoming(ws: web.WebSocketResponse, client: StreamClient) -> None:
    """The protocol is server-to-client; incoming frames are ignored. The loop ends when the
    client closes (or the heartbeat finds it gone), which ends the writer too."""
    try:
        async for message in ws:
            if message.type == WSMsgType.ERROR:
                break
    finally:
        client.abort()


async def _send_ws(
    request: web.Request, ws: web.WebSocketResponse, client: StreamClient, keepalive_s: float
) -> None:
    with contextlib.suppress(ConnectionResetError):
        while not ws.closed:
            frames = await client.take(keepalive_s)
            if not frames:
                if client.closed:
                    return
                continue  # aiohttp's heartbeat pings keep the connection alive
            texts = [frame.ws() for frame in frames]
            if _fits(request.transport, sum(len(text) for text in texts) * 4):
                for text in texts:  # room in the socket buffer: these cannot stall
                    await ws.send_str(text)
            else:
                try:
                    async with asyncio.timeout(keepalive_s * STALLED_WRITE_KEEPALIVES):
                        for text in texts:
                            await ws.send_str(text)
                except TimeoutError:
                    # A close handshake cannot get through a full buffer either: drop the socket.
                    log.info("stream.client_stalled", chat_id=client.chat_id, transport="ws")
                    if request.transport is not None:
                        request.transport.abort()
                    return
            frame = frames[-1]
            if frame.final:
                kind = frame.data.get("kind")
                code = {
                    "shutdown": WSCloseCode.GOING_AWAY,
                    "deleted": WSCloseCode.OK,
                }.get(str(kind), WSCloseCode.TRY_AGAIN_LATER)
                await ws.close(code=code, message=str(kind).encode()[:100])
                return


async def watch_chats(call: Call) -> web.StreamResponse:
    """The caller's chat-list changes. Subscribed before the response starts, so a client that
    lists its chats after receiving the headers misses no change."""
    shutdown = call.request.app[keys.SHUTDOWN]
    with _stream_slot(call):
        async with call.listener.subscribe(owner_channel(call.me.id)) as subscription:
            response = _sse_response()
            await response.prepare(call.request)
            with contextlib.suppress(ConnectionResetError):
                await _send_watch(call, response, subscription, shutdown)
    return response


async def _send_watch(
    call: Call, response: web.StreamResponse, subscription: Subscription, shutdown: asyncio.Event
) -> None:
    async def next_frames(timeout_s: float) -> list[Frame]:
        """The next chat-list frame (notices that are not one are skipped); none when nothing
        came within timeout_s or the replica is shutting down."""
        while not shutdown.is_set():
            event = await _next_event(subscription, shutdown, timeout_s)
            if event is None:
                return []
            frame = owner_frame(event)
            if frame is not None:
                return [frame]
        return []

    await _write_sse_frames(call, response, next_frames, shutdown.is_set)


async def _next_event(
    subscription: Subscription, shutdown: asyncio.Event, timeout_s: float
) -> Notice | Resync | None:
    ready = subscription.get_nowait()
    if ready is not None:
        return ready
    get = asyncio.ensure_future(subscription.get())
    stop = asyncio.ensure_future(shutdown.wait())
    try:
        await asyncio.wait({get, stop}, timeout=timeout_s, return_when="FIRST_COMPLETED")
    finally:
        stop.cancel()
        get.cancel()  # a get that already took its event is done: cancel() is a no-op then
        await asyncio.wait({get, stop})
    if not get.cancelled():
        return get.result()
    return None
