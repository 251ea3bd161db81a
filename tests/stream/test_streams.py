"""Chat streams over real HTTP, with a worker simulated in SQL: resume from any cursor on any
instance with no gap and no duplicate (SSE and WebSocket), joining mid-answer, retries and edits,
status ordering, errors, the queue, keep-alives, the chat-list watch, reclaiming idle hubs,
listener resyncs, deleted chats and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import asyncpg
import pytest
from aiohttp import WSCloseCode, WSMsgType

from app.http.models import ChatListChangeEvent, ChatStreamEvent
from app.stream.hub import StreamHubs
from app.stream.protocol import StreamCursor
from app.terminal import SseEvent
from tests import factories
from tests.conditions import wait_for
from tests.factories import ApiUser
from tests.http_harness import (
    ApiInstance,
    SimulatedWorker,
    StreamReader,
    api_instance,
    assemble,
    message_text,
    new_chat_id,
    open_sse,
)


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[ApiInstance]:
    async with api_instance(database_url) as instance:
        yield instance


@pytest.fixture
async def user(api: ApiInstance) -> ApiUser:
    return await factories.create_api_user(api.pool)


def _is_part(part_id: int) -> Any:
    return lambda e: e.event == "message_part" and e.json()["part_id"] == part_id


def _is_status(status: str) -> Any:
    return lambda e: e.event == "status" and e.json()["status"] == status


def _part_ids(events: list[SseEvent]) -> list[int]:
    return [e.json()["part_id"] for e in events if e.event == "message_part"]


def _parts_text(events: list[SseEvent]) -> str:
    return "".join(e.json()["part"]["text"] for e in events if e.event == "message_part")


def _check_shapes(events: list[SseEvent]) -> None:
    for event in events:
        data = event.json()
        assert data["type"] == event.event
        ChatStreamEvent.model_validate({"event": data})
        assert event.id is not None


async def test_sse_resume_on_another_instance_has_no_gap_and_no_duplicate(
    database_url: str,
) -> None:
    async with api_instance(database_url) as a, api_instance(database_url) as b:
        user = await factories.create_api_user(a.pool)
        chat_id = await new_chat_id(a, user)
        worker = SimulatedWorker(a.pool, chat_id)
        await worker.acquire()
        words = [f"w{i} " for i in range(60)]
        written: list[int] = []  # the part ids of the latest flush window

        async with open_sse(a, user, chat_id) as first:
            for i in range(0, 20, 2):
                written = await worker.parts(*words[i : i + 2])
                await first.until(_is_part(written[-1]))
            cursor = first.last_id
        assert cursor is not None and cursor.endswith(f":{written[-1]}")

        for i in range(20, 40, 2):  # the answer goes on while the client is away
            written = await worker.parts(*words[i : i + 2])

        async with open_sse(b, user, chat_id, last_event_id=cursor) as second:
            await second.until(_is_part(written[-1]))
            for i in range(40, 60, 2):
                written = await worker.parts(*words[i : i + 2])
                await second.until(_is_part(written[-1]))
            message_id = await worker.persist("".join(words))
            await worker.finish()
            await second.until(_is_status("waiting"))

    events = first.events + second.events
    _check_shapes(events)
    part_ids = _part_ids(events)
    assert part_ids == sorted(set(part_ids)), "a part was delivered twice or out of order"
    assert _parts_text(events) == "".join(words)
    view = assemble(events)  # asserts every message arrived once
    assert list(view["messages"]) == [1, message_id]
    assert message_text(view["messages"][message_id]) == "".join(words)
    assert view["live_text"] == ""


async def test_websocket_resume_with_after(api: ApiInstance, user: ApiUser) -> None:
    chat_id = await new_chat_id(api, user)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    words = [f"v{i} " for i in range(30)]
    written: list[int] = []  # the part ids of the latest flush window
    received: list[dict[str, Any]] = []

    async def read_until(ws: aiohttp.ClientWebSocketResponse, predicate: Any) -> None:
        while True:
            message = await ws.receive(timeout=10)
            assert message.type == WSMsgType.TEXT, message
            event = json.loads(message.data)
            received.append(event)
            if predicate(event):
                return

    def part(part_id: int) -> Any:
        return lambda e: e["type"] == "message_part" and e["part_id"] == part_id

    async with api.client.ws_connect(f"/api/v1/chats/{chat_id}/ws", headers=user.headers) as ws:
        for i in range(0, 10, 2):
            written = await worker.parts(*words[i : i + 2])
            await read_until(ws, part(written[-1]))
    cursor = received[-1]["cursor"]
    for i in range(10, 20, 2):
        written = await worker.parts(*words[i : i + 2])
    async with api.client.ws_connect(
        f"/api/v1/chats/{chat_id}/ws?after={cursor}", headers=user.headers
    ) as ws:
        await read_until(ws, part(written[-1]))
        for i in range(20, 30, 2):
            written = await worker.parts(*words[i : i + 2])
            await read_until(ws, part(written[-1]))
        message_id = await worker.persist("".join(words))
        await read_until(ws, lambda e: e["type"] == "message" and e["message"]["id"] == message_id)

    for event in received:
        ChatStreamEvent.model_validate({"event": {k: v for k, v in event.items() if k != "cursor"}})
        assert ":" in event["cursor"]
    part_ids = [e["part_id"] for e in received if e["type"] == "message_part"]
    assert part_ids == sorted(set(part_ids))
    text = "".join(e["part"]["text"] for e in received if e["type"] == "message_part")
    assert text == "".join(words)
    messages = [e["message"]["id"] for e in received if e["type"] == "message"]
    assert messages == [1, message_id]


async def test_a_part_reaches_sse_and_websocket_clients_as_the_json_stored(
    api: ApiInstance, user: ApiUser
) -> None:
    """A part's stored JSON is spliced into its event as PostgreSQL writes it (not decoded and
    encoded again): whatever it holds, the client parses the same JSON, live and in a snapshot."""
    chat_id = await new_chat_id(api, user)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    call = {
        "type": "tool_call",
        "id": "call_1",
        "name": "search",
        "args": {
            "q": 'é "quoted" \\ back\nslash \u2028 \U0001f600',
            "big": 2**70,
            "n": [0.1, -3, 2.5, True, None, {}],
        },
    }
    result = {"type": "tool_result", "tool_call_id": "call_1", "name": "search", "result": "ok"}

    def part(part_id: int) -> Any:
        return lambda e: e["type"] == "message_part" and e["part_id"] == part_id

    async with api.client.ws_connect(f"/api/v1/chats/{chat_id}/ws", headers=user.headers) as ws:
        async with open_sse(api, user, chat_id) as live:
            await live.until(_is_status("running"))
            first = await factories.create_stream_part(
                api.pool, chat_id=chat_id, generation=worker.generation, part=call
            )
            second = await factories.create_stream_part(
                api.pool,
                chat_id=chat_id,
                generation=worker.generation,
                part=result,
                message_role="tool",
            )
            await live.until(_is_part(second["id"]))
        received: list[dict[str, Any]] = []
        while not received or not part(second["id"])(received[-1]):
            message = await ws.receive(timeout=10)
            assert message.type == WSMsgType.TEXT, message
            received.append(json.loads(message.data))
    async with open_sse(api, user, chat_id) as joining:
        await joining.until(_is_part(second["id"]))

    expected = [
        {"part_id": first["id"], "role": "assistant", "part": call},
        {"part_id": second["id"], "role": "tool", "part": result},
    ]
    for events in (
        [e.json() for e in live.events],
        received,
        [e.json() for e in joining.events],
    ):
        parts = [e for e in events if e["type"] == "message_part"]
        assert [
            {"part_id": e["part_id"], "role": e["role"], "part": e["part"]} for e in parts
        ] == expected
        assert all(e["chat_id"] == str(chat_id) for e in parts)


async def test_joining_mid_answer_on_another_instance_gets_the_step_from_its_start(
    database_url: str,
) -> None:
    async with api_instance(database_url) as a, api_instance(database_url) as b:
        user = await factories.create_api_user(a.pool)
        chat_id = await new_chat_id(a, user)
        worker = SimulatedWorker(a.pool, chat_id)
        await worker.acquire()
        before = [pid for i in range(5) for pid in await worker.parts(f"a{i} ", f"b{i} ")]

        async with open_sse(b, user, chat_id) as reader:
            await reader.until(_is_part(before[-1]))
            after: list[int] = []
            for i in range(5):
                after += await worker.parts(f"c{i} ")
                await reader.until(_is_part(after[-1]))
            message_id = await worker.persist("the whole answer")
            await reader.until(
                lambda e: e.event == "message" and e.json()["message"]["id"] == message_id
            )

        assert _part_ids(reader.events) == before + after
        # The snapshot: the history, the step so far, the status, the queue; then live events.
        kinds = [e.event for e in reader.events]
        snapshot = kinds[: kinds.index("queue") + 1]
        assert snapshot == ["message"] + ["message_part"] * len(before) + ["status", "queue"]
        assert reader.events[len(before) + 1].json()["status"] == "running"
        assert kinds[-1] == "message"
        assert reader.events[-1].id == f"{message_id}:0"


async def test_a_retry_voids_the_live_parts_for_watching_and_joining_clients(
    api: ApiInstance, user: ApiUser
) -> None:
    chat_id = await new_chat_id(api, user)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    async with open_sse(api, user, chat_id) as watching:
        written = await worker.parts("doomed ", "attempt ")
        await watching.until(_is_part(written[-1]))
        retry_id = await worker.retry(attempt=1)
        retry = await watching.until(lambda e: e.event == "retry")
        assert retry.id == f"1:{retry_id}"
        assert retry.json() == {
            "type": "retry",
            "chat_id": str(chat_id),
            "attempt": 1,
            "delay_ms": 1000,
            "retrying_at": "2030-01-01T00:00:00+00:00",
            "kind": "overloaded",
            "provider": "anthropic",
            "status_code": 529,
            "error": "overloaded",
        }
        written = await worker.parts("second ", "try")
        await watching.until(_is_part(written[-1]))
        assert assemble(watching.events)["live_text"] == "second try"

        async with open_sse(api, user, chat_id) as joining:
            await joining.until(_is_part(written[-1]))
        kinds = [e.event for e in joining.events]
        assert "retry" in kinds  # a joiner learns why, and gets only what follows the retry
        assert _parts_text(joining.events) == "second try"

        # Resuming from a cursor before the retry also drops the void parts.
        async with open_sse(api, user, chat_id, after=f"1:{retry_id - 1}") as resuming:
            await resuming.until(_is_part(written[-1]))
        assert assemble(resuming.events)["live_text"] == "second try"


async def test_an_edit_resets_history_for_live_and_resuming_clients(
    api: ApiInstance, user: ApiUser
) -> None:
    chat_id = await new_chat_id(api, user, "first question")
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    answer_id = await worker.persist("first answer")
    await worker.finish()
    async with open_sse(api, user, chat_id) as reader:
        await reader.until(_is_status("waiting"))
        stale_cursor = reader.last_id
        assert stale_cursor == f"{answer_id}:0"
        async with api.client.patch(
            f"/api/v1/chats/{chat_id}/messages/1", json={"content": "better"}, headers=user.headers
        ) as response:
            assert response.status == 200
            new_id = (await response.json())["id"]
        await reader.until(lambda e: e.event == "message" and e.json()["message"]["id"] == new_id)
    reset = [e.json() for e in reader.events if e.event == "history_reset"]
    assert reset == [
        {"type": "history_reset", "chat_id": str(chat_id), "from_message_id": 1, "reason": "edit"}
    ]
    view = assemble(reader.events)
    assert [message_text(m) for m in view["messages"].values()] == ["better"]

    # A client that was away during the edit learns it from its stale cursor.
    async with open_sse(api, user, chat_id, last_event_id=stale_cursor) as resumed:
        await resumed.until(lambda e: e.event == "message")
    assert resumed.events[0].event == "history_reset"
    assert resumed.events[0].json()["from_message_id"] <= 1
    assert [message_text(m) for m in assemble(resumed.events)["messages"].values()] == ["better"]


async def test_a_step_voided_without_a_message_is_reset(api: ApiInstance, user: ApiUser) -> None:
    """The run failed or its replica died: the live parts vanish with no message; watchers drop
    them (history_reset step_discarded) and see the parts of the next run."""
    chat_id = await new_chat_id(api, user)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    async with open_sse(api, user, chat_id) as reader:
        written = await worker.parts("lost ", "words")
        await reader.until(_is_part(written[-1]))
        cursor = reader.last_id
        # Requeued and re-acquired (another generation): the old parts are gone.
        await api.pool.execute("DELETE FROM chat_stream_parts WHERE chat_id = $1", chat_id)
        await worker.acquire()
        written = await worker.parts("fresh")
        await reader.until(_is_part(written[-1]))
    reset = [e.json() for e in reader.events if e.event == "history_reset"]
    assert reset and reset[0]["reason"] == "step_discarded" and reset[0]["from_message_id"] == 2
    assert assemble(reader.events)["live_text"] == "fresh"

    async with open_sse(api, user, chat_id, last_event_id=cursor) as resumed:
        await resumed.until(_is_part(written[-1]))
    assert assemble(resumed.events)["live_text"] == "fresh"
    assert resumed.events[0].event == "history_reset"


async def test_statuses_never_go_back_and_errors_carry_last_error(
    api: ApiInstance, user: ApiUser
) -> None:
    chat_id = await new_chat_id(api, user)
    worker = SimulatedWorker(api.pool, chat_id)
    async with open_sse(api, user, chat_id) as reader:
        await reader.until(_is_status("pending"))
        await worker.acquire()
        await reader.until(_is_status("running"))
        for _ in range(3):
            await worker.heartbeat()  # changes the row, not what a stream shows
        await worker.finish(
            "error",
            last_error={
                "kind": "auth",
                "provider": "anthropic",
                "retryable": False,
                "message": "invalid x-api-key",
                "status_code": 401,
                "retry_after_s": None,
                "detail": "authentication_error",
            },
        )
        error = await reader.until(lambda e: e.event == "error")
    statuses = [e.json() for e in reader.events if e.event == "status"]
    assert [s["status"] for s in statuses] == ["pending", "running", "error"]
    versions = [s["version"] for s in statuses]
    assert versions == sorted(set(versions))
    assert error.json() == {
        "type": "error",
        "chat_id": str(chat_id),
        "message": "invalid x-api-key",
        "kind": "auth",
        "provider": "anthropic",
        "retryable": False,
        "status_code": 401,
        "detail": "authentication_error",
    }
    # A client connecting now sees the error too.
    async with open_sse(api, user, chat_id) as late:
        await late.until(lambda e: e.event == "error")


async def test_queue_changes_are_streamed(api: ApiInstance, user: ApiUser) -> None:
    chat_id = await new_chat_id(api, user)
    async with open_sse(api, user, chat_id) as reader:
        first = await reader.until(lambda e: e.event == "queue")
        assert first.json()["queued"] == []
        async with api.client.post(
            f"/api/v1/chats/{chat_id}/messages", json={"content": "later"}, headers=user.headers
        ) as response:
            assert response.status == 202
            queued_id = (await response.json())["queued"]["id"]
        event = await reader.until(lambda e: e.event == "queue")
        assert [q["id"] for q in event.json()["queued"]] == [queued_id]
        async with api.client.delete(
            f"/api/v1/chats/{chat_id}/queue/{queued_id}", headers=user.headers
        ) as response:
            assert response.status == 204
        event = await reader.until(lambda e: e.event == "queue")
        assert event.json()["queued"] == []


async def test_idle_streams_get_keepalives(database_url: str) -> None:
    async with api_instance(database_url, keepalive_interval_s=0.1) as api:
        user = await factories.create_api_user(api.pool)
        chat_id = await new_chat_id(api, user)
        async with open_sse(api, user, chat_id) as reader:
            await reader.until(lambda e: e.event == "queue")
            reading = asyncio.create_task(reader.next(timeout_s=30))
            await wait_for(lambda: reader.parser.comments >= 2, message="keep-alive comments")
            reading.cancel()
            await asyncio.wait([reading])


async def test_idle_hubs_are_reclaimed_and_their_channel_unlistened(
    api: ApiInstance, user: ApiUser
) -> None:
    chat_ids = [await new_chat_id(api, user) for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        for chat_id in chat_ids:
            for _ in range(2):
                reader = await stack.enter_async_context(open_sse(api, user, chat_id))
                await reader.until(lambda e: e.event == "queue")
        stats = api.hubs.stats()
        assert (stats.hubs, stats.clients) == (3, 6)
        assert all(f"chat:{c}" in api.listener._subscribers for c in chat_ids)

    await wait_for(lambda: api.hubs.stats().hubs == 0, message="hubs reclaimed")
    assert api.hubs.stats().clients == 0
    assert not any(f"chat:{c}" in api.listener._subscribers for c in chat_ids)
    assert api.hubs.stats().reads >= 3  # counters of reclaimed hubs are kept


async def test_a_listener_reconnect_resyncs_the_hub(api: ApiInstance, user: ApiUser) -> None:
    chat_id = await new_chat_id(api, user)
    worker = SimulatedWorker(api.pool, chat_id)
    await worker.acquire()
    async with open_sse(api, user, chat_id) as reader:
        await reader.until(_is_status("running"))
        pid = api.listener.backend_pid()
        assert pid is not None
        await api.pool.execute("SELECT pg_terminate_backend($1)", pid)
        written = await worker.parts("said ", "while ", "away")  # may be missed as a notice
        message_id = await worker.persist("said while away")
        await reader.until(
            lambda e: e.event == "message" and e.json()["message"]["id"] == message_id
        )
        await wait_for(lambda: api.listener.stats.connects >= 2, message="listener reconnect")
        await wait_for(lambda: api.hubs.stats().resyncs >= 1, message="hub resync")
        assert written


async def test_a_deleted_chat_ends_its_streams(api: ApiInstance, user: ApiUser) -> None:
    chat_id = await new_chat_id(api, user)
    async with open_sse(api, user, chat_id) as reader:
        await reader.until(lambda e: e.event == "queue")
        await api.pool.execute("DELETE FROM chats WHERE id = $1", chat_id)
        await reader.until_end()
    last = reader.events[-1].json()
    assert (last["type"], last["kind"]) == ("error", "deleted")
    await wait_for(lambda: api.hubs.stats().hubs == 0, message="hub gone")


async def test_shutdown_ends_sse_with_a_final_event_and_websockets_with_going_away(
    database_url: str,
) -> None:
    async with api_instance(database_url) as api:
        user = await factories.create_api_user(api.pool)
        chat_id = await new_chat_id(api, user)
        async with (
            open_sse(api, user, chat_id) as reader,
            api.client.ws_connect(f"/api/v1/chats/{chat_id}/ws", headers=user.headers) as ws,
        ):
            await reader.until(lambda e: e.event == "queue")
            while json.loads((await ws.receive(timeout=10)).data)["type"] != "queue":
                pass
            await api.app.shutdown()
            await reader.until_end()
            final = reader.events[-1].json()
            assert (final["type"], final["kind"], final["retryable"]) == ("error", "shutdown", True)
            assert reader.events[-1].id == "1:0"
            while (message := await ws.receive(timeout=10)).type == WSMsgType.TEXT:
                pass
            assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
            assert ws.close_code == WSCloseCode.GOING_AWAY


async def test_watch_streams_the_callers_chat_list_changes_only(
    api: ApiInstance, user: ApiUser
) -> None:
    other = await factories.create_api_user(api.pool)
    async with api.client.get("/api/v1/chats/watch", headers=user.headers) as response:
        assert response.status == 200
        reader = StreamReader(response)
        chat_id = await new_chat_id(api, user)
        await new_chat_id(api, other)  # not ours: never shown
        created = await reader.next()
        assert (created.event, created.json()["chat_id"]) == ("created", str(chat_id))
        async with api.client.patch(
            f"/api/v1/chats/{chat_id}", json={"title": "renamed"}, headers=user.headers
        ) as patched:
            assert patched.status == 200
        updated = await reader.until(lambda e: e.json().get("title") == "renamed")
        assert updated.event == "updated"
        await api.pool.execute("DELETE FROM chats WHERE id = $1", chat_id)
        deleted = await reader.until(lambda e: e.event == "deleted")
    for event in reader.events:
        ChatListChangeEvent.model_validate(event.json())
        assert event.json()["chat_id"] == str(chat_id)
    assert deleted.json()["chat_id"] == str(chat_id)


async def test_metrics_show_hubs_clients_reads_and_listener_counters(
    api: ApiInstance, user: ApiUser
) -> None:
    chat_id = await new_chat_id(api, user)

    async def metrics() -> dict[str, float]:
        async with api.client.get("/metrics") as response:  # no token needed
            assert response.status == 200
            assert response.content_type == "text/plain"
            text = await response.text()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        assert "# TYPE chatd_stream_hub_reads_total counter" in text
        return samples

    async with open_sse(api, user, chat_id) as first, open_sse(api, user, chat_id) as second:
        await first.until(lambda e: e.event == "queue")
        await second.until(lambda e: e.event == "queue")
        during = await metrics()
        assert during["chatd_stream_hubs"] == 1
        assert during["chatd_stream_clients"] == 2
        assert during["chatd_stream_hub_reads_total"] >= 1
        assert during["chatd_listener_connected"] == 1
        assert during["chatd_listener_connects_total"] >= 1
        assert "chatd_listener_notifications_total" in during
        assert "chatd_listener_reconnects_total" in during
        assert "chatd_stream_client_overflows_total" in during
    await wait_for(lambda: api.hubs.stats().hubs == 0, message="hub reclaimed")
    after = await metrics()
    assert (after["chatd_stream_hubs"], after["chatd_stream_clients"]) == (0, 0)
    assert after["chatd_stream_hub_reads_total"] >= during["chatd_stream_hub_reads_total"]


async def test_a_client_that_leaves_while_its_snapshot_is_read_is_not_kept(
    api: ApiInstance, user: ApiUser
) -> None:
    chat_id = await new_chat_id(api, user)
    entered, gate = asyncio.Event(), asyncio.Event()

    class GatedPool:
        async def fetchrow(self, *args: Any) -> Any:
            entered.set()
            await gate.wait()
            return await api.pool.fetchrow(*args)

        async def fetch(self, *args: Any) -> Any:
            entered.set()
            await gate.wait()
            return await api.pool.fetch(*args)

    hubs = StreamHubs(
        cast(asyncpg.Pool, GatedPool()), api.listener, max_queued_events_per_client=10
    )
    try:
        async with hubs.watch(chat_id, StreamCursor()) as staying:
            async with hubs.watch(chat_id, StreamCursor()) as leaving:
                await asyncio.wait_for(entered.wait(), 10)  # both snapshots are being read
            gate.set()
            first = await staying.next(10)
            assert first is not None and first.event == "message"
            hub = hubs.hub(chat_id)
            assert hub is not None and hub.clients == {staying}
            assert leaving.left and leaving.queued == 0
        assert hubs.stats().hubs == 0
    finally:
        await hubs.aclose()
