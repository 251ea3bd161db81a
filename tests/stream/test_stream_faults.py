"""Streams under hostile input and database faults (issue 9): a client's cursor never moves the
hub (items 7), a hub read that fails or stalls is retried under a deadline while its clients stay
connected (9), snapshots are read and fed page by page (10), archiving a running chat discards
its live parts (11), and open streams are capped per user (13)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from app.stream.hub import StreamHubs
from app.stream.protocol import Frame, StreamCursor
from app.stream.reader import ReadPolicy, ReadRequest, StreamReader
from app.terminal import SseEvent
from tests import factories
from tests.conditions import wait_for
from tests.factories import ApiUser
from tests.http_harness import (
    ApiInstance,
    SimulatedWorker,
    api_instance,
    assemble,
    new_chat_id,
    open_sse,
)


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url, keepalive_interval_s=0.1) as instance:
        yield instance


@pytest.fixture
async def user(api: ApiInstance) -> ApiUser:
    return await factories.create_api_user(api.pool)


def _is_part(part_id: int) -> Any:
    return lambda e: e.event == "message_part" and e.json()["part_id"] == part_id


def _is_message(message_id: int) -> Any:
    return lambda e: e.event == "message" and e.json()["message"]["id"] == message_id


def _errors(events: list[SseEvent]) -> list[dict[str, Any]]:
    return [e.json() for e in events if e.event == "error"]


# --------------------------------------------------------------------------------------------
# 7. A client's cursor only ever bounds what its own client gets.


@pytest.mark.parametrize("hostile_cursor", ["0:999999999999", "999999999999:0"])
async def test_a_cursor_from_the_future_does_not_silence_the_other_watchers(
    api: ApiInstance, user: ApiUser, hostile_cursor: str
) -> None:
    chat_id = await new_chat_id(api, user)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    async with open_sse(api, user, chat_id, after=hostile_cursor) as hostile:
        await hostile.until(lambda e: e.event == "queue")  # the hub was built for it
        async with open_sse(api, user, chat_id) as honest:
            await honest.until(lambda e: e.event == "queue")
            written = await worker.parts("every ", "word")
            await honest.until(_is_part(written[-1]))
            message_id = await worker.persist("every word")
            await honest.until(_is_message(message_id))
            # The hostile client gets the live events too, with the chat's own cursors.
            await hostile.until(_is_message(message_id))
    assert assemble(honest.events)["messages"].keys() == {1, message_id}
    assert hostile.events[-1].id == f"{message_id}:0"
    if hostile_cursor.endswith(":0"):
        # A message cursor beyond the chat's newest message replays nothing and continues
        # from the chat's newest message, not from the future.
        assert all(not e.id.startswith("999999999999:") for e in hostile.events if e.id)


# --------------------------------------------------------------------------------------------
# 9. Hub reads degrade gracefully: retried with backoff under a deadline; clients stay.


@contextlib.asynccontextmanager
async def _messages_locked(database_url: str) -> AsyncIterator[None]:
    """Every stream read blocks while this holds an exclusive lock on chat_messages."""
    conn = await asyncpg.connect(database_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE chat_messages IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await conn.close()


async def _blocked_stream_read(pool: asyncpg.Pool) -> int:
    """The backend of a stream read waiting for a lock (0 when there is none yet)."""
    pid: int | None = await pool.fetchval(
        """
        SELECT pid FROM pg_stat_activity
        WHERE wait_event_type = 'Lock' AND query LIKE '-- The reads of every hub%'
          AND pid <> pg_backend_pid()
        LIMIT 1
        """
    )
    return pid or 0


async def test_a_hub_read_cut_by_an_outage_is_retried_and_its_clients_stay(
    api: ApiInstance, user: ApiUser, database_url: str
) -> None:
    chat_id = await new_chat_id(api, user)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    async with open_sse(api, user, chat_id) as reader:
        await reader.until(lambda e: e.event == "queue")
        hub = api.hubs.hub(chat_id)
        assert hub is not None
        async with _messages_locked(database_url):
            written = await worker.parts("through ", "the ", "outage")
            pid: int = await wait_for(
                lambda: _blocked_stream_read(api.pool), message="blocked read"
            )
            # The server closes the read's connection (a restart, a failover, an admin).
            await api.pool.execute("SELECT pg_terminate_backend($1)", pid)
            await wait_for(lambda: hub.counters.read_failures >= 1, message="a failed read")
            # The retry blocks again; meanwhile the client still gets keep-alives.
            reading = asyncio.create_task(reader.until(_is_part(written[-1])))
            comments = reader.parser.comments
            await wait_for(lambda: reader.parser.comments >= comments + 2, message="keep-alives")
        await reading
    assert _errors(reader.events) == []
    assert assemble(reader.events)["live_text"] == "through the outage"


async def test_a_stalled_hub_read_times_out_and_clients_are_told_after_a_bound(
    api: ApiInstance, user: ApiUser, database_url: str
) -> None:
    api.hubs.policy = ReadPolicy(
        deadline_s=0.2, retry_initial_s=0.05, retry_max_s=0.1, give_up_after_s=1.0
    )
    chat_id = await new_chat_id(api, user)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    async with open_sse(api, user, chat_id) as reader:
        await reader.until(lambda e: e.event == "queue")
        cursor = reader.last_id
        async with _messages_locked(database_url):
            await worker.parts("never ", "read")
            final = await reader.until(lambda e: e.event == "error")
            await reader.until_end()
    assert (final.json()["kind"], final.json()["retryable"]) == ("unavailable", True)
    assert final.id == cursor  # reconnect from there: nothing was lost
    assert api.hubs.stats().read_failures >= 2


async def test_a_bug_in_a_hub_read_tells_its_clients_at_once(
    api: ApiInstance, user: ApiUser
) -> None:
    """Not an outage: no retry. (The statement fails with a data error on every try.)"""
    chat_id = await new_chat_id(api, user)
    async with open_sse(api, user, chat_id) as reader:
        await reader.until(lambda e: e.event == "queue")
        api.hubs.policy = ReadPolicy(page_messages=-2)  # LIMIT -1: a bad statement
        await factories.create_message(api.pool, chat_id=chat_id, text="a read that fails")
        final = await reader.until(lambda e: e.event == "error")
    assert final.json()["kind"] == "unavailable"
    assert api.hubs.stats().read_failures == 0


# --------------------------------------------------------------------------------------------
# 10. Snapshots are read in bounded pages and fed to a client as it drains.


async def test_a_snapshot_read_returns_at_most_one_page_per_statement(
    api: ApiInstance, user: ApiUser
) -> None:
    chat_id = await new_chat_id(api, user)
    await factories.create_messages(api.pool, chat_id=chat_id, count=30, size=50_000)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    await worker.parts("live")
    expected: list[int] = [
        row["id"]
        for row in await api.pool.fetch(
            "SELECT id FROM chat_messages WHERE chat_id = $1 ORDER BY id", chat_id
        )
    ]
    for page_messages, page_bytes, most in ((100, 120_000, 3), (7, 10_000_000, 7)):
        reader = StreamReader(
            api.pool, policy=ReadPolicy(page_messages=page_messages, page_bytes=page_bytes)
        )
        seen: list[int] = []
        after = 0
        while True:
            read = await reader.read(ReadRequest(chat_id, True, after, 0, True, []))
            assert read.messages is not None
            assert 1 <= len(read.messages) <= most
            sizes = [len(payload.json()) for _id, payload in read.messages]
            assert len(sizes) == 1 or sum(sizes) <= page_bytes + 1_000 * len(sizes)
            seen += [message_id for message_id, _payload in read.messages]
            after = seen[-1]
            if not read.more_messages:
                break
            assert read.parts is None  # the step in progress comes after every message
        assert seen == expected
        assert read.parts is not None and len(read.parts) == 1
        await reader.aclose()


async def test_a_client_from_the_start_gets_every_message_once_in_order_page_by_page(
    api: ApiInstance, user: ApiUser
) -> None:
    api.hubs.policy = ReadPolicy(page_messages=5, page_bytes=100_000)
    chat_id = await new_chat_id(api, user)
    await factories.create_messages(api.pool, chat_id=chat_id, count=40, size=20_000)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    step = await worker.parts("one ", "two ", "three")
    async with (
        open_sse(api, user, chat_id) as honest,  # an up-to-date watcher, live all along
        api.hubs.watch(chat_id, StreamCursor()) as client,
    ):
        await honest.until(_is_part(step[-1]))
        frames: list[Frame] = []
        most_queued = 0
        added: int | None = None
        while not frames or frames[-1].event != "queue":
            await wait_for(lambda: client.queued > 0, message="a snapshot page")
            most_queued = max(most_queued, client.queued)
            frame = await client.next(10)
            assert frame is not None
            frames.append(frame)
            if len(frames) == 12 and added is None:
                added = await worker.persist("said while the client caught up")
        assert added is not None
        # Joined the live clients: later events reach it like any other.
        more = await worker.parts("live")
        while frames[-1].data.get("part_id") != more[-1]:
            frame = await client.next(10)
            assert frame is not None
            frames.append(frame)
    ids = [f.data["message"]["id"] for f in frames if f.event == "message"]
    expected = [
        row["id"]
        for row in await api.pool.fetch(
            "SELECT id FROM chat_messages WHERE chat_id = $1 ORDER BY id", chat_id
        )
    ]
    assert ids == expected and added in ids  # every message once, in order
    parts = [f.data["part_id"] for f in frames if f.event == "message_part"]
    assert parts == more  # the step ended with the message; the new one is live
    assert most_queued <= 5 + 3 + 2  # one page (and the step and status+queue with the last)


async def test_sse_from_the_start_assembles_a_long_history(api: ApiInstance, user: ApiUser) -> None:
    api.hubs.policy = ReadPolicy(page_messages=3, page_bytes=50_000)
    chat_id = await new_chat_id(api, user)
    await factories.create_messages(api.pool, chat_id=chat_id, count=25, size=30_000)
    async with open_sse(api, user, chat_id, after="0:0") as reader:
        await reader.until(lambda e: e.event == "queue")
    view = assemble(reader.events)  # asserts no message twice
    ids = list(view["messages"])
    assert ids == sorted(ids) and len(ids) == 26
    assert [e.event for e in reader.events][-2:] == ["status", "queue"]


# --------------------------------------------------------------------------------------------
# 11. Archiving a running chat discards its live parts, for watchers and joiners alike.


async def test_archiving_a_running_chat_discards_its_live_parts(
    api: ApiInstance, user: ApiUser
) -> None:
    chat_id = await new_chat_id(api, user)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    async with open_sse(api, user, chat_id) as watching:
        written = await worker.parts("soon ", "a ", "ghost")
        await watching.until(_is_part(written[-1]))
        async with api.client.patch(
            f"/api/v1/chats/{chat_id}", json={"archived": True}, headers=user.headers
        ) as response:
            assert response.status == 200
        reset = await watching.until(lambda e: e.event == "history_reset")
        assert reset.json()["reason"] == "step_discarded"
        assert reset.json()["from_message_id"] == 2
        assert assemble(watching.events)["live_text"] == ""
    left = await api.pool.fetchval(
        "SELECT count(*) FROM chat_stream_parts WHERE chat_id = $1", chat_id
    )
    assert left == 0  # deleted with the archive

    # The fenced-out run still manages a flush (the flush takes no lock on the chat row).
    await worker.parts("late ", "flush")
    async with open_sse(api, user, chat_id) as joining:
        await joining.until(lambda e: e.event == "queue")
    assert [e.event for e in joining.events] == ["message", "status", "queue"]


# --------------------------------------------------------------------------------------------
# 13. Open streams per user.


async def test_open_streams_are_capped_per_user(database_url: str) -> None:
    async with api_instance(database_url, max_streams_per_user=2) as api:
        user = await factories.create_api_user(api.pool)
        other = await factories.create_api_user(api.pool)
        chat_id = await new_chat_id(api, user)
        other_chat = await new_chat_id(api, other)

        async def refused(path: str) -> None:
            async with api.client.get(path, headers=user.headers) as response:
                assert response.status == 429
                body = await response.json()
            assert body["limit"] == "streams_per_user" and body["maximum"] == 2
            with pytest.raises(aiohttp.WSServerHandshakeError) as handshake:
                await api.client.ws_connect(f"/api/v1/chats/{chat_id}/ws", headers=user.headers)
            assert handshake.value.status == 429

        async with (
            open_sse(api, user, chat_id) as first,
            api.client.get("/api/v1/chats/watch", headers=user.headers) as watch,
        ):
            assert watch.status == 200
            await first.until(lambda e: e.event == "queue")
            await refused(f"/api/v1/chats/{chat_id}/stream")
            await refused("/api/v1/chats/watch")
            async with open_sse(api, other, other_chat) as others:  # another user's own quota
                await others.until(lambda e: e.event == "queue")
        await wait_for(lambda: api.hubs.slots.open(user.id) == 0, message="slots released")
        async with api.client.ws_connect(f"/api/v1/chats/{chat_id}/ws", headers=user.headers) as ws:
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "message"


# --------------------------------------------------------------------------------------------
# 9. A black-holed database (accepts, never answers) cannot wedge a hub past its deadline.


class _StallingProxy:
    """TCP in front of the test server's socket. `stall()` stops forwarding in both directions
    while every connection stays open (a half-open network); `resume()` forwards again."""

    def __init__(self, database_url: str) -> None:
        parsed = urllib.parse.urlsplit(database_url)
        self._database = parsed.path.lstrip("/")
        query = urllib.parse.parse_qs(parsed.query)
        self._socket = f"{query['host'][0]}/.s.PGSQL.{query.get('port', ['5432'])[0]}"
        self._user = parsed.username or "postgres"
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> _StallingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"postgresql://{self._user}@127.0.0.1:{port}/{self._database}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        server_r, server_w = await asyncio.open_unix_connection(self._socket)
        pipes = [
            asyncio.create_task(self._pipe(client_r, server_w)),
            asyncio.create_task(self._pipe(server_r, client_w)),
        ]
        self._tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for writer in (client_w, server_w):
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await self._flowing.wait()  # stalled: held, neither sent nor refused
                writer.write(data)
                await writer.drain()


async def test_a_black_holed_database_cannot_wedge_a_hub_past_its_deadline(
    api: ApiInstance, user: ApiUser, database_url: str
) -> None:
    chat_id = await new_chat_id(api, user)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    async with _StallingProxy(database_url) as proxy:
        pool = await asyncpg.create_pool(proxy.url, min_size=1, max_size=2)
        assert pool is not None
        policy = ReadPolicy(deadline_s=0.3, retry_initial_s=0.05, retry_max_s=0.1)
        hubs = StreamHubs(pool, api.listener, max_queued_events_per_client=100, policy=policy)
        try:
            async with hubs.watch(chat_id, StreamCursor()) as client:
                frames: list[Frame] = []
                while not frames or frames[-1].event != "queue":
                    frame = await client.next(10)
                    assert frame is not None
                    frames.append(frame)
                hub = hubs.hub(chat_id)
                assert hub is not None
                proxy.stall()
                written = await worker.parts("after ", "the ", "black ", "hole")
                # Each read gives up at its deadline and is tried again, while the network is
                # still black-holed.
                await wait_for(lambda: hub.counters.read_failures >= 3, message="read deadlines")
                assert not client.closed
                proxy.resume()
                while not frames or frames[-1].data.get("part_id") != written[-1]:
                    frame = await client.next(20)
                    assert frame is not None
                    frames.append(frame)
            assert [f.event for f in frames if f.event == "error"] == []
        finally:
            await hubs.aclose()
            await pool.close()


async def test_a_hub_a_page_behind_catches_up_page_by_page(api: ApiInstance, user: ApiUser) -> None:
    """A burst of messages larger than a page in one commit: the hub reads them page by page;
    its clients get every message once, in order, then what the last page brings (the queue)."""
    api.hubs.policy = ReadPolicy(page_messages=2)
    chat_id = await new_chat_id(api, user)
    async with open_sse(api, user, chat_id) as reader:
        await reader.until(lambda e: e.event == "queue")
        async with api.pool.acquire() as conn, conn.transaction():
            await factories.create_messages(conn, chat_id=chat_id, count=7, size=10)
            await factories.create_queued_message(conn, chat_id=chat_id, text="later")
        queued = await reader.until(lambda e: e.event == "queue")
    assert [q["content"][0]["text"] for q in queued.json()["queued"]] == ["later"]
    ids = list(assemble(reader.events)["messages"])  # asserts no message twice
    assert len(ids) == 8 and ids == sorted(ids)
    kinds = [e.event for e in reader.events]
    assert kinds[kinds.index("queue") + 1 :] == ["message"] * 7 + ["queue"]
