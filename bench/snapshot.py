"""Snapshot cost of a chat with a long history of large messages (issue 9, item 10).

    .venv/bin/python -m bench.snapshot [--messages 201] [--size 100000]

On a fresh database of the test suite's embedded PostgreSQL: one chat with `--messages`
assistant messages of `--size` characters (what anyone can build with the free echo model).
Measures, for a client reconnecting with `after=0:0`:

- one `stream_read` from 0:0 (what a joining client's first read costs): the bytes of the
  message payloads it returned, its wall time, and the longest event-loop stall during it (a
  1 ms ticker measures how late it wakes: the statement's decoding and the payloads' building
  run on the event loop, delaying every other stream and request of the replica);
- the whole snapshot through a hub (`StreamHubs.watch`, the client draining as fast as it can
  and encoding each frame as a connection's writer does): wall time, the longest stall, the
  most frames and (in a separate, untimed pass) bytes held in the client's queue at once.

Only uses APIs that exist before and after the change, so the same script measures both trees
(`PYTHONPATH=<tree>`)."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import asyncpg

from app.db.listener import Listener
from app.stream.hub import StreamHubs
from app.stream.protocol import StreamCursor
from app.stream.reader import ReadRequest, StreamReader
from tests.pg import start_pg_test_server

T = TypeVar("T")


class StallMeter:
    """The longest delay of a 1 ms ticker while `measure` runs."""

    def __init__(self) -> None:
        self.worst_s = 0.0

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.001)
            self.worst_s = max(self.worst_s, loop.time() - start - 0.001)

    async def measure(self, work: Awaitable[T]) -> T:
        ticker = asyncio.create_task(self._tick())
        await asyncio.sleep(0.01)
        try:
            return await work
        finally:
            ticker.cancel()


async def _chat(pool: asyncpg.Pool, messages: int, size: int) -> uuid.UUID:
    user_id = await pool.fetchval(
        """
        WITH o AS (INSERT INTO organizations (name) VALUES ('bench') RETURNING id)
        INSERT INTO users (name, organization_id) SELECT 'bench', id FROM o RETURNING id
        """
    )
    chat_id: uuid.UUID = await pool.fetchval(
        """
        INSERT INTO chats (owner_id, organization_id)
        SELECT id, organization_id FROM users WHERE id = $1 RETURNING id
        """,
        user_id,
    )
    await pool.execute(
        """
        INSERT INTO chat_messages (chat_id, role, content)
        SELECT $1, 'assistant', jsonb_build_array(jsonb_build_object(
                   'type', 'text', 'text', n::text || ' ' || repeat('word ', $3 / 5)))
        FROM generate_series(1, $2) AS n
        """,
        chat_id,
        messages,
        size,
    )
    return chat_id


async def _one_read(pool: asyncpg.Pool, chat_id: uuid.UUID) -> dict[str, Any]:
    reader = StreamReader(pool)
    meter = StallMeter()
    start = time.perf_counter()
    read = await meter.measure(reader.read(ReadRequest(chat_id, True, 0, 0, True, [])))
    elapsed = time.perf_counter() - start
    await reader.aclose()
    assert read.messages is not None
    return {
        "messages": len(read.messages),
        "bytes": sum(len(payload.json()) for _id, payload in read.messages),
        "wall_ms": round(elapsed * 1000, 1),
        "stall_ms": round(meter.worst_s * 1000, 1),
    }


async def _whole_snapshot(
    pool: asyncpg.Pool, dsn: str, chat_id: uuid.UUID, *, count_bytes: bool
) -> dict[str, Any]:
    """The client takes each frame and encodes it, as its connection's writer does. With
    `count_bytes`, also the most bytes queued at once (encoding every queued frame at each step
    distorts the timings: they are not reported then)."""
    listener = Listener(dsn, keepalive_interval_s=1.0)
    listening = asyncio.create_task(listener.run())
    await listener.wait_connected()
    hubs = StreamHubs(pool, listener, max_queued_events_per_client=1000)
    most_frames = most_bytes = messages = 0

    async def drain() -> None:
        nonlocal most_frames, most_bytes, messages
        async with hubs.watch(chat_id, StreamCursor()) as client:
            while True:
                most_frames = max(most_frames, client.queued)
                if count_bytes:
                    queued = list(client._frames)  # a measurement
                    most_bytes = max(most_bytes, sum(len(f.sse()) for f in queued))
                frame = await client.next(10)
                assert frame is not None
                frame.sse()
                messages += frame.event == "message"
                if frame.event == "queue":
                    return

    meter = StallMeter()
    start = time.perf_counter()
    try:
        await meter.measure(drain())
    finally:
        await hubs.aclose()
        listening.cancel()
        await asyncio.wait([listening])
    if count_bytes:
        return {"most_queued_frames": most_frames, "most_queued_bytes": most_bytes}
    return {
        "messages": messages,
        "wall_ms": round((time.perf_counter() - start) * 1000, 1),
        "stall_ms": round(meter.worst_s * 1000, 1),
        "most_queued_frames": most_frames,
    }


async def main(messages: int, size: int, repeat: int) -> None:
    server = await start_pg_test_server()
    try:
        name, dsn = await server.create_database()
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        assert pool is not None
        try:
            chat_id = await _chat(pool, messages, size)
            for _ in range(repeat):
                print("one read from 0:0:", await _one_read(pool, chat_id))
            for _ in range(repeat):
                timed = await _whole_snapshot(pool, dsn, chat_id, count_bytes=False)
                print("whole snapshot:   ", timed)
            held = await _whole_snapshot(pool, dsn, chat_id, count_bytes=True)
            print("client queue:     ", held)
        finally:
            await pool.close()
            await server.drop_database(name)
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=201)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.size, args.repeat))
