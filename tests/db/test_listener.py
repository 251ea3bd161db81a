"""The listener against a real server: delivery, reconnect with resync, bounded queues."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.db.listener import Listener, Notice, Resync
from tests import factories
from tests.conditions import wait_for


@pytest.fixture
async def listener(database_url: str) -> AsyncIterator[Listener]:
    listener = Listener(database_url, keepalive_interval_s=0.5, reconnect_backoff_initial_s=0.05)
    task = asyncio.create_task(listener.run(), name="listener")
    try:
        async with asyncio.timeout(10):
            await listener.wait_connected()
        yield listener
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_subscribers_receive_trigger_notifications_of_their_channel_only(
    listener: Listener, conn: asyncpg.Connection
) -> None:
    first = await factories.create_chat(conn)
    second = await factories.create_chat(conn)
    async with (
        listener.subscribe(f"chat:{first['id']}") as sub_first,
        listener.subscribe(f"chat:{second['id']}") as sub_second,
    ):
        await conn.execute("UPDATE chats SET title = 'one' WHERE id = $1", first["id"])
        async with asyncio.timeout(5):
            event = await sub_first.get()
        assert isinstance(event, Notice)
        assert event.channel == f"chat:{first['id']}"
        assert '"version" : 2' in event.payload or '"version": 2' in event.payload
        assert sub_second.get_nowait() is None


async def test_two_subscribers_of_one_channel_share_one_listen(
    listener: Listener, conn: asyncpg.Connection
) -> None:
    chat = await factories.create_chat(conn)
    channel = f"chat:{chat['id']}"
    async with listener.subscribe(channel) as a, listener.subscribe(channel) as b:
        await conn.execute("UPDATE chats SET title = 'x' WHERE id = $1", chat["id"])
        async with asyncio.timeout(5):
            assert isinstance(await a.get(), Notice)
            assert isinstance(await b.get(), Notice)
        assert listener.stats.notifications == 1
    # The last one out UNLISTENs: nothing is delivered to the listener any more.
    await conn.execute("UPDATE chats SET title = 'y' WHERE id = $1", chat["id"])
    async with listener.subscribe("chat_wake") as wake:
        await conn.execute("UPDATE chats SET status = 'pending' WHERE id = $1", chat["id"])
        async with asyncio.timeout(5):
            assert isinstance(await wake.get(), Notice)
    assert listener.stats.notifications == 2


async def test_terminated_backend_reconnects_and_resyncs_every_subscriber(
    listener: Listener, conn: asyncpg.Connection
) -> None:
    chats = [await factories.create_chat(conn) for _ in range(3)]
    async with (
        listener.subscribe(f"chat:{chats[0]['id']}") as s0,
        listener.subscribe(f"chat:{chats[1]['id']}") as s1,
        listener.subscribe(f"chat:{chats[2]['id']}") as s2,
    ):
        old_pid = listener.backend_pid()
        assert old_pid is not None
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", old_pid)

        for sub in (s0, s1, s2):
            async with asyncio.timeout(10):
                assert await sub.get() == Resync("connected")
        new_pid = await wait_for(listener.backend_pid, message="listener reconnected")
        assert new_pid != old_pid

        # The new connection LISTENs on every channel again.
        await conn.execute("UPDATE chats SET title = 'after' WHERE id = $1", chats[2]["id"])
        async with asyncio.timeout(5):
            event = await s2.get()
        assert isinstance(event, Notice)
        assert event.channel == f"chat:{chats[2]['id']}"


async def test_a_subscriber_that_does_not_read_gets_one_resync_instead_of_unbounded_growth(
    database_url: str, conn: asyncpg.Connection
) -> None:
    listener = Listener(database_url, max_queued_per_subscriber=5)
    task = asyncio.create_task(listener.run(), name="listener")
    try:
        await listener.wait_connected()
        chat = await factories.create_chat(conn)
        async with listener.subscribe(f"chat:{chat['id']}") as sub:
            for i in range(20):
                await conn.execute("UPDATE chats SET title = $2 WHERE id = $1", chat["id"], f"t{i}")
            await wait_for(lambda: listener.stats.notifications >= 20, message="20 notifications")
            events = []
            while (event := sub.get_nowait()) is not None:
                events.append(event)
        assert len(events) <= 5
        assert Resync("overflow") in events
        assert sub.overflows >= 1
        # What follows the resync is the newest notifications, never older ones.
        after = [e for e in events[events.index(Resync("overflow")) + 1 :]]
        assert all(isinstance(e, Notice) for e in after)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_subscribing_while_disconnected_is_resynced_on_connect(database_url: str) -> None:
    listener = Listener(database_url)
    async with listener.subscribe("chat_wake") as sub:
        task = asyncio.create_task(listener.run(), name="listener")
        try:
            async with asyncio.timeout(10):
                assert await sub.get() == Resync("connected")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
