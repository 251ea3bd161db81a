"""Fan-out: many streaming chats, many SSE subscribers on replicas that do not run those chats.

Topology (real `chatd serve` processes on the bench database): `WORKERS` replicas run the chats
(each takes at most its share), `STREAMERS` replicas take no chats (`CHATD_MAX_CONCURRENT_RUNS=0`)
and serve every subscriber, so every token a subscriber receives crossed replicas through
PostgreSQL: worker flush -> NOTIFY -> the streamer's listener -> its hub's read -> SSE.

How times are taken. The echo model runs with `options.emit_timestamps: true`: the worker
appends the wall clock (`time.time()`) to each word when the provider emits it. The bench's SSE
clients (aiohttp, bearer token, one connection each) take the wall clock when the chunk that
completes a `message_part` frame arrives, and every word in the frame gives one sample:
receipt - emit. Both clocks are the same host clock. The clients run in the bench process, on
the same 2 cores: their own scheduling delay is part of the number (as it would be for a real
client), so the latency is an upper bound of the server's.

Per replica, from `/metrics` and `/proc` between the moment the turns are sent and the moment
every subscriber has seen the turn end:

- worker NOTIFY-carrying commits/s: `chatd_part_flushes_total` (one flush statement = one
  transaction = one NOTIFY commit for all the chats of the replica), and the same per flush
  window (the design's target is about 1, whatever the number of chats);
- streamer reads/s and reads per notification (`chatd_stream_hub_*`);
- streamer CPU per subscriber and per word delivered to a subscriber, worker CPU per word
  (utime + stime of the processes from /proc/<pid>/stat), and memory per subscriber (VmRSS
  growth of the streamers while the idle subscribers connect).

A word reaches a subscriber in a live part, or in the step's message when the hub's read came
after the step was persisted (the transaction that persists it deletes its parts): the first
arrival counts, so every word gives one sample per subscriber. The chats start in groups spread
over `START_SPREAD_S`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import asyncpg

from app.http.auth import create_token
from app.state.model import Owner
from bench.chatd_engine import BenchReplica, replica_set
from bench.harness import ScenarioResult, percentile
from bench.processes import ProcessSample, postgres_cpu_s, postmaster_pid, sample_process

WORKERS = 2
STREAMERS = 2
TOKEN_DELAY_MS = 50
FLUSH_WINDOW_MS = 15.0  # the replicas' default part_flush_interval_ms


@dataclass(frozen=True)
class Scale:
    chats: int
    subscribers_per_chat: int
    words: int

    @property
    def subscribers(self) -> int:
        return self.chats * self.subscribers_per_chat


DEFAULT_SCALE = Scale(chats=200, subscribers_per_chat=3, words=60)
LARGE_SCALE = Scale(chats=1000, subscribers_per_chat=2, words=60)
# The chats start in this many groups spread over this long (a steady stream of answers, as
# traffic is, rather than every chat starting in the same millisecond; the groups still make
# bursts of acquires and run starts).
START_GROUPS = 10
START_SPREAD_S = 1.5

_STAMP = re.compile(rb"@(\d+\.\d{6})")
CONNECT_TIMEOUT_S = 120.0
CONNECTING_AT_ONCE = 64
STREAM_TIMEOUT_S = 60.0


@dataclass
class Subscriber:
    """One SSE connection: records the latency of every stamped word it receives."""

    url: str
    token: str
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    latencies_ms: list[float] = field(default_factory=list)
    stamps: set[bytes] = field(default_factory=set)
    done: bool = False
    error: str | None = None

    async def run(self, session: aiohttp.ClientSession, connecting: asyncio.Semaphore) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with connecting:  # until the response's headers are in
                    response = await stack.enter_async_context(
                        session.get(self.url, headers={"Authorization": f"Bearer {self.token}"})
                    )
                if response.status != 200:
                    self.error = f"HTTP {response.status}"
                    return
                buffer = b""
                async for chunk in response.content.iter_any():
                    received_at = time.time()
                    buffer += chunk
                    while b"\n\n" in buffer:
                        frame, buffer = buffer.split(b"\n\n", 1)
                        self._frame(frame, received_at)
                    if self.done:
                        return
        except (aiohttp.ClientError, OSError) as exc:
            self.error = repr(exc)
        finally:
            self.connected.set()  # never leave the bench waiting on a failed client

    def _frame(self, frame: bytes, received_at: float) -> None:
        event = data = b""
        for line in frame.split(b"\n"):
            if line.startswith(b"event: "):
                event = line[7:]
            elif line.startswith(b"data: "):
                data = line[6:]
        if event in (b"message_part", b"message"):
            # A word arrives in a live part, or, when the hub's read came after the step was
            # persisted (its parts are deleted in that transaction), in the message: the first
            # arrival counts. Only the stamps matter; no JSON decode of every frame.
            for stamp in _STAMP.findall(data):
                if stamp not in self.stamps:
                    self.stamps.add(stamp)
                    self.latencies_ms.append((received_at - float(stamp)) * 1000)
            if event == b"message" and b'"role":"assistant"' in data:
                # The answer is persisted in the transaction that ends the turn (a hub that fell
                # behind may coalesce the statuses pending/running/waiting away entirely).
                self.done = True
        elif event == b"status":
            self.connected.set()


def _samples(replicas: list[BenchReplica]) -> list[ProcessSample]:
    samples = []
    for replica in replicas:
        assert replica.process is not None
        samples.append(sample_process(replica.process.pid))
    return samples


async def scrape(session: aiohttp.ClientSession, replica: BenchReplica) -> dict[str, float]:
    """/metrics as {name: value}, summed over labels."""
    async with session.get(replica.url + "/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        values[name] = values.get(name, 0.0) + float(value)
    return values


async def _scrape_all(
    session: aiohttp.ClientSession, replicas: list[BenchReplica]
) -> list[dict[str, float]]:
    return list(await asyncio.gather(*(scrape(session, r) for r in replicas)))


async def _setup(pool: asyncpg.Pool, scale: Scale) -> tuple[str, list[uuid.UUID]]:
    """A user with a token, a stamped slow echo model, and idle chats (waiting, no message)."""
    name = f"bench-fanout-{uuid.uuid4().hex[:8]}"
    token = await create_token(pool, name)
    row = await pool.fetchrow("SELECT id, organization_id FROM users WHERE name = $1", name)
    assert row is not None
    owner = Owner(user_id=row["id"], organization_id=row["organization_id"])
    model_id = await pool.fetchval(
        "INSERT INTO chat_model_configs (provider, model, options)"
        " VALUES ('builtin', 'echo', $1::jsonb) RETURNING id",
        json.dumps({"token_delay_ms": TOKEN_DELAY_MS, "emit_timestamps": True}),
    )
    chat_ids = [uuid.uuid4() for _ in range(scale.chats)]
    await pool.execute(
        """
        INSERT INTO chats (id, owner_id, organization_id, title, status, model_config_id)
        SELECT id, $2, $3, 'bench fan-out', 'waiting', $4 FROM unnest($1::uuid[]) AS id
        """,
        chat_ids,
        owner.user_id,
        owner.organization_id,
        model_id,
    )
    return token, chat_ids


async def _send_all(pool: asyncpg.Pool, chat_ids: list[uuid.UUID], text: str) -> None:
    """Every chat of a group gets its user message and becomes pending, in one transaction
    (rows locked first, as every message insert does)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE chats SET status = 'pending' WHERE id = ANY($1::uuid[])", chat_ids
        )
        await conn.execute(
            """
            INSERT INTO chat_messages (chat_id, role, content)
            SELECT id, 'user', $2::jsonb FROM unnest($1::uuid[]) AS id
            """,
            chat_ids,
            json.dumps([{"type": "text", "text": text}]),
        )


def _delta(after: list[dict[str, float]], before: list[dict[str, float]], name: str) -> list[float]:
    return [a.get(name, 0.0) - b.get(name, 0.0) for a, b in zip(after, before, strict=True)]


async def run(dsn: str, result: ScenarioResult, scale: Scale = DEFAULT_SCALE) -> None:
    per_worker = math.ceil(scale.chats / WORKERS)
    specs = [(f"worker{i}", {"CHATD_MAX_CONCURRENT_RUNS": str(per_worker)}) for i in range(WORKERS)]
    # One bench user opens every subscriber stream: its per-user stream cap is lifted.
    streamer_env = {
        "CHATD_MAX_CONCURRENT_RUNS": "0",
        "CHATD_MAX_STREAMS_PER_USER": str(scale.subscribers),
    }
    specs += [(f"streamer{i}", streamer_env) for i in range(STREAMERS)]
    async with replica_set(dsn, specs) as processes:
        workers, streamers = processes[:WORKERS], processes[WORKERS:]
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        assert pool is not None
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            try:
                await _measure(
                    pool,
                    session=session,
                    workers=workers,
                    streamers=streamers,
                    result=result,
                    scale=scale,
                )
            finally:
                await pool.close()


async def _measure(  # noqa: PLR0915  one measurement, read top to bottom
    pool: asyncpg.Pool,
    *,
    session: aiohttp.ClientSession,
    workers: list[BenchReplica],
    streamers: list[BenchReplica],
    result: ScenarioResult,
    scale: Scale,
) -> None:
    token, chat_ids = await _setup(pool, scale)
    idle = _samples(streamers)
    subscribers = [
        Subscriber(
            url=f"{streamers[(c * scale.subscribers_per_chat + k) % len(streamers)].url}"
            f"/api/v1/chats/{chat_id}/stream",
            token=token,
        )
        for c, chat_id in enumerate(chat_ids)
        for k in range(scale.subscribers_per_chat)
    ]
    # Connections are opened at most CONNECTING_AT_ONCE at a time: the replicas' listen
    # backlog (128) would drop a thousand SYNs arriving together, and the clients would then
    # wait for the kernel's SYN retries.
    connecting = asyncio.Semaphore(CONNECTING_AT_ONCE)
    tasks = [asyncio.create_task(s.run(session, connecting)) for s in subscribers]
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await asyncio.gather(*(s.connected.wait() for s in subscribers))
        failed = [s.error for s in subscribers if s.error]
        if failed:
            raise RuntimeError(f"{len(failed)} subscribers failed to connect: {failed[:3]}")
        connected = _samples(streamers)
        before = await _scrape_all(session, [*workers, *streamers])
        busy = _samples([*workers, *streamers])
        postmaster = await postmaster_pid(pool)
        pg_before = postgres_cpu_s(postmaster)
        client_before = time.process_time()

        text = " ".join(f"w{i}" for i in range(scale.words))
        began = time.perf_counter()
        group_size = math.ceil(len(chat_ids) / START_GROUPS)
        for group in range(START_GROUPS):
            if group:
                await asyncio.sleep(START_SPREAD_S / START_GROUPS)
            await _send_all(pool, chat_ids[group * group_size : (group + 1) * group_size], text)
        try:
            async with asyncio.timeout(STREAM_TIMEOUT_S):
                await asyncio.gather(*tasks)
        except TimeoutError:
            statuses = await pool.fetch(
                "SELECT status, count(*) FROM chats WHERE id = ANY($1::uuid[]) GROUP BY status",
                chat_ids,
            )
            raise RuntimeError(
                f"fanout: after {STREAM_TIMEOUT_S}s {sum(s.done for s in subscribers)} of"
                f" {len(subscribers)} subscribers got the answer; chats:"
                f" {dict((r['status'], r['count']) for r in statuses)}"
            ) from None
        elapsed_s = time.perf_counter() - began
        after = await _scrape_all(session, [*workers, *streamers])
        done = _samples([*workers, *streamers])
        client_cpu_s = time.process_time() - client_before
        pg_after = postgres_cpu_s(postmaster)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    incomplete = [s for s in subscribers if not s.done]
    if incomplete:
        result.notes.append(f"fanout: {len(incomplete)} subscribers did not see the turn end")
    latencies = [ms for s in subscribers for ms in s.latencies_ms]
    expected = scale.subscribers * (scale.words + 1)  # "echo:" + the words
    if len(latencies) != expected:
        result.notes.append(f"fanout: {len(latencies)} stamped words received, {expected} sent")
    result.add("token_latency_p50_ms", percentile(latencies, 50), "ms")
    result.add("token_latency_p99_ms", percentile(latencies, 99), "ms")

    n_workers = len(workers)
    flushes = _delta(after[:n_workers], before[:n_workers], "chatd_part_flushes_total")
    flushes_per_s = sum(flushes) / n_workers / elapsed_s
    result.add("worker_flush_commits_per_s", flushes_per_s, "1/s")
    result.add("worker_flushes_per_window", flushes_per_s * FLUSH_WINDOW_MS / 1000.0, "1")
    parts = _delta(after[:n_workers], before[:n_workers], "chatd_parts_written_total")
    result.add("parts_per_flush", sum(parts) / max(sum(flushes), 1.0), "1", better="higher")

    stream_after, stream_before = after[n_workers:], before[n_workers:]
    reads = sum(_delta(stream_after, stream_before, "chatd_stream_hub_reads_total"))
    notices = sum(_delta(stream_after, stream_before, "chatd_stream_hub_notifications_total"))
    result.add("streamer_reads_per_s", reads / len(streamers) / elapsed_s, "1/s")
    result.add("streamer_reads_per_notification", reads / max(notices, 1.0), "1")
    if "chatd_stream_read_statements_total" in stream_after[0]:  # when the replicas export it
        statements = sum(_delta(stream_after, stream_before, "chatd_stream_read_statements_total"))
        result.add("streamer_read_statements_per_s", statements / len(streamers) / elapsed_s, "1/s")

    stream_cpu_s = sum(
        d.cpu_s - b.cpu_s for d, b in zip(done[n_workers:], busy[n_workers:], strict=True)
    )
    worker_cpu_s = sum(
        d.cpu_s - b.cpu_s for d, b in zip(done[:n_workers], busy[:n_workers], strict=True)
    )
    # CPU per unit of work, which stays meaningful when the machine is saturated (CPU per
    # second would only show the saturation): per subscriber (for one answer of `words` words),
    # per word delivered to one subscriber, per word a worker streamed.
    tokens = scale.words + 1
    result.add("streamer_cpu_ms_per_subscriber", stream_cpu_s * 1000 / scale.subscribers, "ms")
    result.add(
        "streamer_cpu_us_per_delivered_token",
        stream_cpu_s * 1e6 / (scale.subscribers * tokens),
        "us",
    )
    result.add("worker_cpu_us_per_token", worker_cpu_s * 1e6 / (scale.chats * tokens), "us")
    # How many cores the replicas, PostgreSQL and the bench's own SSE clients kept busy: their
    # sum near the machine's core count means the latency is mostly queueing for the CPU.
    result.add("replicas_busy_cores", (stream_cpu_s + worker_cpu_s) / elapsed_s, "1")
    if pg_after:  # backends that started meanwhile count whole
        pg_cpu_s = sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items())
        result.add("postgres_busy_cores", pg_cpu_s / elapsed_s, "1")
    result.add("clients_busy_cores", client_cpu_s / elapsed_s, "1")
    rss_kb = sum(c.rss_kb - i.rss_kb for c, i in zip(connected, idle, strict=True))
    result.add("streamer_rss_kb_per_subscriber", rss_kb / scale.subscribers, "KB")
    result.add("turn_s", elapsed_s, "s")
