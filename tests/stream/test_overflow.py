"""A client that stops reading never grows server memory: once its bounded queue is full it is
told to resync (a final `error` event of kind `resync` carrying the cursor of the last event it
was given) and disconnected; resuming from that cursor loses nothing. A client that never reads
again is disconnected when its write stalls. Other clients of the chat are not affected."""

from __future__ import annotations

import asyncio
import socket
import uuid

from app.terminal import SseEvent, SseParser
from tests import factories
from tests.conditions import wait_for
from tests.factories import ApiUser
from tests.http_harness import ApiInstance, SimulatedWorker, StreamReader, api_instance

MAX_QUEUED = 8
PART_TEXT_CHARS = 32_000  # large frames fill the socket buffers quickly


class RawSseClient:
    """An SSE client on a socket with a tiny receive buffer, that reads only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = SseParser()
        self.local_address = writer.get_extra_info("sockname")

    @classmethod
    async def connect(cls, api: ApiInstance, path: str, user: ApiUser) -> RawSseClient:
        server = api.client.server
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        # HTTP/1.0: the body is the raw event stream up to the connection's end (no chunking).
        request = f"GET {path} HTTP/1.0\r\nHost: test\r\nAuthorization: Bearer {user.token}\r\n"
        writer.write(request.encode() + b"\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0], head
        return cls(reader, writer)

    async def read_to_end(self, timeout_s: float = 30.0) -> list[SseEvent]:
        events: list[SseEvent] = []
        pending = b""
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                pending += chunk
                cut = pending.rfind(b"\n") + 1
                if cut:
                    events += self.parser.feed(pending[:cut].decode())
                    pending = pending[cut:]
        return events

    def close(self) -> None:
        self.writer.close()


async def _setup(api: ApiInstance) -> tuple[ApiUser, uuid.UUID, SimulatedWorker]:
    user = await factories.create_api_user(api.pool)
    async with api.client.post(
        "/api/v1/chats", json={"content": "a long answer please"}, headers=user.headers
    ) as response:
        chat_id = uuid.UUID((await response.json())["id"])
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    return user, chat_id, worker


async def _stream_until_overflow(
    api: ApiInstance, worker: SimulatedWorker, healthy: StreamReader
) -> list[str]:
    """Write big parts (paced by a healthy client) until the stalled client overflows."""
    written: list[str] = []
    for i in range(400):
        text = f"<{i}>" + "x" * PART_TEXT_CHARS
        part_id = (await worker.parts(text))[-1]
        written.append(text)
        await healthy.until(
            lambda e, p=part_id: e.event == "message_part" and e.json()["part_id"] == p
        )
        hub = api.hubs.hub(worker.chat_id)
        assert hub is not None
        assert all(client.queued <= MAX_QUEUED + 1 for client in hub.clients)
        if api.hubs.stats().overflows:
            return written
    raise AssertionError("the stalled client never overflowed")


async def test_an_overflowing_client_is_told_to_resync_and_resumes_without_a_gap(
    database_url: str,
) -> None:
    async with api_instance(
        database_url, max_queued_events_per_client=MAX_QUEUED, keepalive_interval_s=5.0
    ) as api:
        user, chat_id, worker = await _setup(api)
        path = f"/api/v1/chats/{chat_id}/stream"
        slow = await RawSseClient.connect(api, path, user)
        async with api.client.get(path, headers=user.headers) as response:
            healthy = StreamReader(response)
            written = await _stream_until_overflow(api, worker, healthy)

            # The stalled client left the hub; the healthy one is still served.
            hub = api.hubs.hub(chat_id)
            assert hub is not None and len(hub.clients) == 1
            more = "after the overflow"
            part_id = (await worker.parts(more))[-1]
            written.append(more)
            await healthy.until(
                lambda e: e.event == "message_part" and e.json()["part_id"] == part_id
            )

            # The slow client reads again: what was in flight, then the resync notice, then EOF.
            slow_events = await slow.read_to_end()
            slow.close()
            final = slow_events[-1]
            assert final.event == "error"
            assert (final.json()["kind"], final.json()["retryable"]) == ("resync", True)
            assert final.id is not None

            async with api.client.get(
                path, headers=user.headers | {"Last-Event-ID": final.id}
            ) as resumed_response:
                resumed = StreamReader(resumed_response)
                await resumed.until(
                    lambda e: e.event == "message_part" and e.json()["part_id"] == part_id
                )

    events = [e for e in slow_events + resumed.events if e.event == "message_part"]
    part_ids = [e.json()["part_id"] for e in events]
    assert part_ids == sorted(set(part_ids))
    assert "".join(e.json()["part"]["text"] for e in events) == "".join(written)
    assert "".join(
        e.json()["part"]["text"] for e in healthy.events if e.event == "message_part"
    ) == "".join(written)


async def test_a_client_that_never_reads_again_is_disconnected(database_url: str) -> None:
    async with api_instance(
        database_url, max_queued_events_per_client=MAX_QUEUED, keepalive_interval_s=0.25
    ) as api:
        user, chat_id, worker = await _setup(api)
        path = f"/api/v1/chats/{chat_id}/stream"
        slow = await RawSseClient.connect(api, path, user)
        async with api.client.get(path, headers=user.headers) as response:
            healthy = StreamReader(response)
            await _stream_until_overflow(api, worker, healthy)
            # The stalled write hits its deadline and the server drops the connection; nothing
            # of that client remains on the server.
            runner = api.client.server.runner
            assert runner is not None and runner.server is not None
            server = runner.server

            def slow_connection_open() -> bool:
                return any(
                    handler.transport is not None
                    and handler.transport.get_extra_info("peername") == slow.local_address
                    for handler in server.connections
                )

            assert slow_connection_open()
            await wait_for(
                lambda: not slow_connection_open(),
                message="the server dropped the stalled connection",
            )
            await slow.read_to_end()  # what the kernel held, then the end of the connection
        slow.close()
        await wait_for(lambda: api.hubs.stats().hubs == 0, message="hub reclaimed")
