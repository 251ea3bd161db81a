"""The peer: PGQueuer (a Python asyncpg job queue driven by LISTEN/NOTIFY) on the same
PostgreSQL in the same run. We measure what it is best at, no-op jobs:

- throughput: N no-op jobs enqueued in one batch, time until the last one ran;
- pickup latency: one job at a time; from the moment the enqueue committed (client clock right
  after the statement returned) to the moment the handler starts (same process, same clock)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import asyncpg
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries

from bench.harness import ScenarioResult, percentile

THROUGHPUT_JOBS = 2000
PICKUP_ROUNDS = 200


async def run(dsn: str, result: ScenarioResult) -> None:
    worker_conn = await asyncpg.connect(dsn)
    producer_conn = await asyncpg.connect(dsn)
    try:
        producer = Queries(AsyncpgDriver(producer_conn))
        await producer.install()
        manager = QueueManager(Queries(AsyncpgDriver(worker_conn)))
        started_at: list[float] = []
        done = asyncio.Event()
        expected = 0

        @manager.entrypoint("noop")
        async def noop(_job: Job) -> None:
            started_at.append(time.perf_counter())
            if len(started_at) >= expected:
                done.set()

        worker = asyncio.create_task(
            manager.run(dequeue_timeout=timedelta(seconds=5), batch_size=10), name="pgqueuer"
        )
        try:
            # Warm up: the first job pays for connection setup and plan caching.
            expected = 1
            await producer.enqueue("noop", None)
            await asyncio.wait_for(done.wait(), 30)

            pickups_ms: list[float] = []
            for _ in range(PICKUP_ROUNDS):
                started_at.clear()
                done.clear()
                expected = 1
                await producer.enqueue("noop", None)
                committed_at = time.perf_counter()
                await asyncio.wait_for(done.wait(), 30)
                pickups_ms.append((started_at[0] - committed_at) * 1000)
            result.add("pickup_p50_ms", percentile(pickups_ms, 50), "ms")
            result.add("pickup_p99_ms", percentile(pickups_ms, 99), "ms")

            started_at.clear()
            done.clear()
            expected = THROUGHPUT_JOBS
            begin = time.perf_counter()
            await producer.enqueue(
                ["noop"] * THROUGHPUT_JOBS, [None] * THROUGHPUT_JOBS, [0] * THROUGHPUT_JOBS
            )
            await asyncio.wait_for(done.wait(), 120)
            result.add(
                "jobs_per_s", THROUGHPUT_JOBS / (time.perf_counter() - begin), "1/s", "higher"
            )
        finally:
            manager.shutdown.set()
            await asyncio.wait_for(worker, 30)
    finally:
        await worker_conn.close()
        await producer_conn.close()
