"""Fan-out: 1,000 SSE clients on one chat across two app instances (each with its own pool and
listener). Every client receives every event, in the same order with the same cursors, and each
instance makes ONE database read per notification however many clients it serves (measured by
the hub's read counter)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import aiohttp

from app.stream.hub import ChatStreamHub
from app.terminal import SseEvent, iter_sse
from tests import factories
from tests.conditions import wait_for
from tests.http_harness import ApiInstance, SimulatedWorker, api_instance

CLIENTS_PER_INSTANCE = 500
WINDOWS = 10


class Watcher:
    def __init__(self) -> None:
        self.events: list[SseEvent] = []
        self.snapshot_done = False

    async def run(self, response: aiohttp.ClientResponse) -> None:
        async for event in iter_sse(response):
            self.events.append(event)
            if event.event == "queue":
                self.snapshot_done = True
            if event.event == "status" and event.json()["status"] == "waiting":
                return


def _hub(api: ApiInstance, chat_id: uuid.UUID) -> ChatStreamHub:
    hub = api.hubs.hub(chat_id)
    assert hub is not None
    return hub


async def test_a_thousand_clients_on_two_instances_one_read_per_notification(
    database_url: str,
) -> None:
    async with (
        # One user opens every stream: lift its per-user cap for this test.
        api_instance(database_url, max_streams_per_user=CLIENTS_PER_INSTANCE) as a,
        api_instance(database_url, max_streams_per_user=CLIENTS_PER_INSTANCE) as b,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        contextlib.AsyncExitStack() as responses,
    ):
        user = await factories.create_api_user(a.pool)
        async with a.client.post(
            "/api/v1/chats", json={"content": "tell everyone"}, headers=user.headers
        ) as response:
            chat_id = uuid.UUID((await response.json())["id"])
        worker = SimulatedWorker(a.pool, chat_id)
        await worker.acquire()

        connecting = asyncio.Semaphore(64)  # stay under the listen backlog

        async def connect(api: ApiInstance) -> aiohttp.ClientResponse:
            async with connecting:
                response = await responses.enter_async_context(
                    session.get(api.url(f"/api/v1/chats/{chat_id}/stream"), headers=user.headers)
                )
                assert response.status == 200
                return response

        watchers: list[Watcher] = []
        tasks: list[asyncio.Task[None]] = []
        for api in (a, b):
            for response in await asyncio.gather(
                *(connect(api) for _ in range(CLIENTS_PER_INSTANCE))
            ):
                watcher = Watcher()
                watchers.append(watcher)
                tasks.append(asyncio.create_task(watcher.run(response)))
        await wait_for(
            lambda: all(w.snapshot_done for w in watchers), message="every snapshot", timeout_s=60
        )
        for api in (a, b):
            assert len(_hub(api, chat_id).clients) == CLIENTS_PER_INSTANCE
            assert api.hubs.stats().hubs == 1
        before = {id(api): _hub(api, chat_id).counters for api in (a, b)}
        reads_before = {k: v.reads for k, v in before.items()}
        notices_before = {k: v.notifications for k, v in before.items()}

        expected_parts: list[int] = []
        for window in range(WINDOWS):
            expected_parts += await worker.parts(f"word{window}a ", f"word{window}b ")
            last = expected_parts[-1]
            await wait_for(
                lambda last=last: all(
                    w.events[-1].event == "message_part" and w.events[-1].json()["part_id"] == last
                    for w in watchers
                ),
                message=f"window {window} everywhere",
                timeout_s=30,
            )
        message_id = await worker.persist("the answer")
        await worker.finish()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)

        measured = {}
        for name, api in (("a", a), ("b", b)):
            counters = _hub(api, chat_id).counters
            reads = counters.reads - reads_before[id(api)]
            notices = counters.notifications - notices_before[id(api)]
            measured[name] = (reads, notices)
            # WINDOWS part flushes + the message + the status change: one read each.
            assert notices == WINDOWS + 2, measured
            assert reads == notices, measured
        print(f"reads/notifications per instance with {CLIENTS_PER_INSTANCE} clients: {measured}")

    # Every client got the same live events after its snapshot, with the same cursors.
    reference: list[tuple[str, str | None, str]] | None = None
    for watcher in watchers:
        start = next(i for i, e in enumerate(watcher.events) if e.event == "queue") + 1
        live = [(e.event, e.id, e.data) for e in watcher.events[start:]]
        if reference is None:
            reference = live
        assert live == reference
    assert reference is not None
    kinds = [kind for kind, _, _ in reference]
    assert kinds == ["message_part"] * len(expected_parts) + ["message", "status"]
    assert reference[-2][1] == f"{message_id}:0"
    assert [int(e[1].split(":")[1]) for e in reference[: len(expected_parts)] if e[1]] == (
        expected_parts
    )
