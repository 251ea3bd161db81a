"""Physical limits of the PostgreSQL under test, measured in the same run as everything else,
so chatd's numbers can be read against what the server can do at all:

- notify_latency: pg_notify committed on one connection -> received by an asyncpg listener on
  another (the floor under every pickup and every token that crosses replicas);
- insert commits/s, and insert + NOTIFY commits/s (NOTIFY takes a global lock at commit, which is
  why chatd coalesces its part writes)."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from bench.harness import ScenarioResult, percentile

NOTIFY_ROUNDS = 300
COMMIT_SECONDS = 2.0
COMMIT_CONNECTIONS = 4


async def notify_latency(dsn: str, result: ScenarioResult) -> None:
    listener = await asyncpg.connect(dsn)
    sender = await asyncpg.connect(dsn)
    received: asyncio.Queue[float] = asyncio.Queue()
    try:
        await listener.add_listener(
            "bench_ping", lambda *_args: received.put_nowait(time.perf_counter())
        )
        latencies_ms: list[float] = []
        for _ in range(NOTIFY_ROUNDS):
            sent_at = time.perf_counter()
            await sender.execute("SELECT pg_notify('bench_ping', '')")
            arrived_at = await asyncio.wait_for(received.get(), 5)
            latencies_ms.append((arrived_at - sent_at) * 1000)
        result.add("notify_latency_p50_ms", percentile(latencies_ms, 50), "ms")
        result.add("notify_latency_p99_ms", percentile(latencies_ms, 99), "ms")
    finally:
        await listener.close()
        await sender.close()


async def _commit_rate(dsn: str, statement: str) -> float:
    connections = [await asyncpg.connect(dsn) for _ in range(COMMIT_CONNECTIONS)]
    try:
        await connections[0].execute(
            "CREATE TABLE IF NOT EXISTS bench_commits (id bigserial PRIMARY KEY, v int)"
        )
        deadline = time.perf_counter() + COMMIT_SECONDS
        counts = [0] * COMMIT_CONNECTIONS

        async def worker(index: int, conn: asyncpg.Connection) -> None:
            while time.perf_counter() < deadline:
                await conn.execute(statement)
                counts[index] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(i, c) for i, c in enumerate(connections)))
        return sum(counts) / (time.perf_counter() - started)
    finally:
        for conn in connections:
            await conn.close()


async def commit_rates(dsn: str, result: ScenarioResult) -> None:
    plain = await _commit_rate(dsn, "INSERT INTO bench_commits (v) VALUES (1)")
    notifying = await _commit_rate(
        dsn,
        "WITH i AS (INSERT INTO bench_commits (v) VALUES (1) RETURNING id)"
        " SELECT pg_notify('bench_commit', id::text) FROM i",
    )
    result.add("insert_commits_per_s", plain, "1/s", better="higher")
    result.add("insert_notify_commits_per_s", notifying, "1/s", better="higher")
