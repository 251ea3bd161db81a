"""chatd's engine measured with real `chatd serve` replica processes on the bench database.

How times are taken: the bench inserts chats itself (the same one-transaction insert the API
does: a pending chat plus its first message) with ids it chose, LISTENing on `chat:<id>` before
the insert commits. t0 is the client clock right after COMMIT returned; t1 is the client clock
when the trigger's notification of the state of interest arrives. So every chatd number includes
one NOTIFY hop back to the bench (see `physical/notify_latency_p50_ms`), which the peer's
in-process handler timing does not pay: the comparison is conservative for chatd.

- pickup: pending committed -> `running` notification, 2 idle replicas, one chat at a time;
  also with wake notifications off (`CHATD_ACQUIRE_LISTEN=0`, poll only) as the baseline;
- turns/s: N chats committed in one transaction -> the last `waiting` (answered) notification,
  echo model without delay, 2 replicas, after a warm-up burst (pool connections open and
  statements prepared, as on a server that has been up a while);
- interrupt: Stop committed on a streaming chat -> `waiting` notification;
- failover: SIGKILL of the replica that runs a streaming chat -> `running` on another replica.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import asyncpg

from app.db.queries import Conn
from app.state import chats
from app.state.model import Owner
from bench.harness import ScenarioResult, percentile
from bench.processes import postgres_cpu_s, postmaster_pid, sample_process
from tests.e2e.replicas import ReplicaProcess

DEFAULT_ORGANIZATION_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")
ECHO_MODEL_ID = uuid.UUID("00000000-0000-0000-0000-0000000000e0")
PICKUP_ROUNDS = 150
THROUGHPUT_CHATS = 2000
THROUGHPUT_WARMUP_CHATS = 400
INTERRUPT_ROUNDS = 30
FAILOVER_ROUNDS = 8
LONG_TEXT = " ".join(f"word{i}" for i in range(400))


def replica_env(dsn: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": dsn,
        "CHATD_LOG_LEVEL": "WARNING",
        "CHATD_MAX_CONCURRENT_RUNS": "200",
        # The scenarios measure the engine with one user's burst of chats (inserted in SQL, so
        # the API's chat and pending limits do not apply): the per-user running cap must not
        # be what they measure.
        "CHATD_MAX_RUNNING_CHATS_PER_USER": "100000",
    } | extra


class BenchReplica(ReplicaProcess):
    """A real `chatd serve` process, optionally running the code of another source tree (the
    baseline of a before/after comparison: `python -m bench --baseline DIR`)."""

    def __init__(self, *, log_dir: Path, env: dict[str, str], name: str, tree: Path | None):
        super().__init__(log_dir=log_dir, env=env, name=name)
        self.tree = tree

    def start(self) -> None:
        if self.tree is None:
            super().start()
            return
        log_file = self.log_path.open("ab")
        # `python -m` puts the working directory first on sys.path: the tree's `app` wins over
        # the editable install of this one.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            cwd=self.tree,
            env=self._env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()


# The source tree replica processes run: None is this one; `--baseline DIR` sets another for the
# scenarios' baseline runs.
SOURCE_TREE: Path | None = None


@asynccontextmanager
async def replica_set(
    dsn: str, specs: list[tuple[str, dict[str, str]]]
) -> AsyncIterator[list[BenchReplica]]:
    """Replica processes named and configured one by one: (name, extra environment)."""
    log_dir = Path(tempfile.mkdtemp(prefix="chatd-bench-logs-"))
    started = [
        BenchReplica(log_dir=log_dir, env=replica_env(dsn, **env), name=name, tree=SOURCE_TREE)
        for name, env in specs
    ]
    failed = True
    try:
        for replica in started:
            replica.start()
        for replica in started:
            await replica.wait_healthy(timeout_s=60)
        yield started
        failed = False
    finally:
        for replica in started:
            if replica.process is not None and replica.process.poll() is None:
                replica.signal(signal.SIGTERM)
        for replica in started:
            if replica.process is not None:
                try:
                    await replica.wait_exit(timeout_s=15)
                except TimeoutError:
                    replica.kill()
        if failed:
            print(f"bench: the replicas' logs are kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


def replicas(dsn: str, count: int, **env: str) -> AbstractAsyncContextManager[list[BenchReplica]]:
    """`count` identical replica processes."""
    return replica_set(dsn, [(f"r{i}", env) for i in range(count)])


Predicate = Callable[[dict[str, object]], bool]


class ChatWatcher:
    """LISTENs on chat channels and hands each notification of a kind (`chat` by default:
    the row changed; `parts`: live parts were flushed) to waiters by predicate."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._waiters: dict[str, tuple[str, Predicate, asyncio.Future[float]]] = {}

    def _on(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        waiter = self._waiters.get(channel)
        if waiter is None:
            return
        event = json.loads(str(payload))
        kind, predicate, future = waiter
        if event.get("type") == kind and predicate(event) and not future.done():
            future.set_result(time.perf_counter())

    async def expect(
        self, chat_id: uuid.UUID, predicate: Predicate, *, kind: str = "chat"
    ) -> asyncio.Future[float]:
        channel = f"chat:{chat_id}"
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters[channel] = (kind, predicate, future)
        await self._conn.add_listener(channel, self._on)
        return future

    async def done(self, chat_id: uuid.UUID) -> None:
        channel = f"chat:{chat_id}"
        self._waiters.pop(channel, None)
        await self._conn.remove_listener(channel, self._on)


async def new_owner(conn: Conn) -> Owner:
    row = await conn.fetchrow(
        "INSERT INTO users (name) VALUES ($1) RETURNING id, organization_id",
        f"bench-{uuid.uuid4().hex[:8]}",
    )
    assert row is not None
    return Owner(user_id=row["id"], organization_id=row["organization_id"])


async def _model(conn: Conn, token_delay_ms: int) -> uuid.UUID:
    model_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO chat_model_configs (provider, model, options)"
        " VALUES ('builtin', 'echo', $1::jsonb) RETURNING id",
        json.dumps({"token_delay_ms": token_delay_ms}),
    )
    return model_id


async def insert_chats(
    conn: Conn,
    owner: Owner,
    chat_ids: list[uuid.UUID],
    text: str,
    model_id: uuid.UUID = ECHO_MODEL_ID,
) -> None:
    """Pending chats with their first message, in one transaction (as the API creates one)."""
    async with conn.transaction():
        await conn.execute(
            """
            INSERT INTO chats (id, owner_id, organization_id, title, status, model_config_id)
            SELECT id, $2, $3, 'bench', 'pending', $4 FROM unnest($1::uuid[]) AS id
            """,
            chat_ids,
            owner.user_id,
            owner.organization_id,
            model_id,
        )
        await conn.execute(
            """
            INSERT INTO chat_messages (chat_id, role, content)
            SELECT id, 'user', $2::jsonb FROM unnest($1::uuid[]) AS id
            """,
            chat_ids,
            json.dumps([{"type": "text", "text": text}]),
        )


def _is(status: str) -> Callable[[dict[str, object]], bool]:
    return lambda event: event.get("status") == status


def _first_running(seen: dict[str, object]) -> Callable[[dict[str, object]], bool]:
    """Matches the first `running` and remembers which replica took the chat."""

    def matches(event: dict[str, object]) -> bool:
        if event.get("status") == "running":
            seen.setdefault("worker_id", event.get("worker_id"))
            return True
        return False

    return matches


def _running_elsewhere(seen: dict[str, object]) -> Callable[[dict[str, object]], bool]:
    return lambda event: (
        event.get("status") == "running" and event.get("worker_id") != seen["worker_id"]
    )


async def pickup(dsn: str, result: ScenarioResult, *, listen: bool) -> None:
    suffix = "" if listen else "_poll_only"
    env = {} if listen else {"CHATD_ACQUIRE_LISTEN": "0"}
    async with replicas(dsn, 2, **env):
        conn = await asyncpg.connect(dsn)
        watch_conn = await asyncpg.connect(dsn)
        try:
            owner = await new_owner(conn)
            watcher = ChatWatcher(watch_conn)
            pickups_ms: list[float] = []
            rounds = PICKUP_ROUNDS if listen else PICKUP_ROUNDS // 5
            for _ in range(rounds):
                chat_id = uuid.uuid4()
                running = await watcher.expect(chat_id, _is("running"))
                await insert_chats(conn, owner, [chat_id], "ping")
                committed_at = time.perf_counter()
                pickups_ms.append((await asyncio.wait_for(running, 30) - committed_at) * 1000)
                await watcher.done(chat_id)
                answered = await watcher.expect(chat_id, _is("waiting"))
                # The replicas are idle again before the next round.
                status = await conn.fetchval("SELECT status FROM chats WHERE id = $1", chat_id)
                if status != "waiting":
                    await asyncio.wait_for(answered, 30)
                await watcher.done(chat_id)
            result.add(f"pickup{suffix}_p50_ms", percentile(pickups_ms, 50), "ms")
            result.add(f"pickup{suffix}_p99_ms", percentile(pickups_ms, 99), "ms")
        finally:
            await conn.close()
            await watch_conn.close()


async def throughput(dsn: str, result: ScenarioResult) -> None:
    async with replicas(dsn, 2) as running:
        conn = await asyncpg.connect(dsn)
        watch_conn = await asyncpg.connect(dsn)
        try:
            owner = await new_owner(conn)
            answered = 0
            target = 0
            all_done = asyncio.Event()

            def on_owner_event(_c: object, _p: int, _ch: str, payload: object) -> None:
                nonlocal answered
                if json.loads(str(payload)).get("status") == "waiting":
                    answered += 1
                    if answered >= target:
                        all_done.set()

            async def burst(count: int) -> float:
                nonlocal answered, target
                answered, target = 0, count
                all_done.clear()
                began = time.perf_counter()
                await insert_chats(conn, owner, [uuid.uuid4() for _ in range(count)], "hello there")
                await asyncio.wait_for(all_done.wait(), 300)
                return time.perf_counter() - began

            await watch_conn.add_listener(f"chat_owner:{owner.user_id}", on_owner_event)
            # Warm up: a server that has been up a while has its pool connections open and its
            # statements prepared on each of them; the peer gets a warm-up job too.
            await burst(THROUGHPUT_WARMUP_CHATS)
            postmaster = await postmaster_pid(conn)
            pids = [r.process.pid for r in running if r.process is not None]
            replicas_before = sum(sample_process(pid).cpu_s for pid in pids)
            pg_before = postgres_cpu_s(postmaster)
            elapsed = await burst(THROUGHPUT_CHATS)
            replicas_cpu_s = sum(sample_process(pid).cpu_s for pid in pids) - replicas_before
            pg_after = postgres_cpu_s(postmaster)
            assistant_messages = await conn.fetchval(
                "SELECT count(*) FROM chat_messages WHERE role = 'assistant'"
            )
            expected = THROUGHPUT_WARMUP_CHATS + THROUGHPUT_CHATS
            if assistant_messages != expected:
                result.notes.append(f"turns: {assistant_messages} answers for {expected} chats")
            result.add("turns_per_s", THROUGHPUT_CHATS / elapsed, "1/s", better="higher")
            # Where a turn's CPU goes (what bounds turns/s on a machine the bench shares): the
            # replica processes and the PostgreSQL server, per turn, from /proc.
            result.add("replicas_cpu_us_per_turn", replicas_cpu_s * 1e6 / THROUGHPUT_CHATS, "us")
            if pg_after:
                pg_cpu_s = sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items())
                result.add("postgres_cpu_us_per_turn", pg_cpu_s * 1e6 / THROUGHPUT_CHATS, "us")
        finally:
            await conn.close()
            await watch_conn.close()


async def interrupt(dsn: str, result: ScenarioResult) -> None:
    async with replicas(dsn, 2):
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        watch_conn = await asyncpg.connect(dsn)
        assert pool is not None
        try:
            async with pool.acquire() as conn:
                owner = await new_owner(conn)
                slow = await _model(conn, token_delay_ms=20)
            watcher = ChatWatcher(watch_conn)
            latencies_ms: list[float] = []
            for _ in range(INTERRUPT_ROUNDS):
                chat_id = uuid.uuid4()
                # Stop mid-answer: after the first live parts were flushed (a Stop that lands
                # before the step began is a different, cheaper path).
                streaming = await watcher.expect(chat_id, lambda _event: True, kind="parts")
                async with pool.acquire() as conn:
                    await insert_chats(conn, owner, [chat_id], LONG_TEXT, slow)
                await asyncio.wait_for(streaming, 30)
                await watcher.done(chat_id)
                stopped = await watcher.expect(chat_id, _is("waiting"))
                await chats.interrupt(pool, owner, chat_id)
                requested_at = time.perf_counter()
                latencies_ms.append((await asyncio.wait_for(stopped, 30) - requested_at) * 1000)
                await watcher.done(chat_id)
            result.add("interrupt_p50_ms", percentile(latencies_ms, 50), "ms")
            result.add("interrupt_p99_ms", percentile(latencies_ms, 99), "ms")
        finally:
            await pool.close()
            await watch_conn.close()


async def failover(dsn: str, result: ScenarioResult) -> None:
    async with replicas(dsn, 2) as running_replicas:
        conn = await asyncpg.connect(dsn)
        watch_conn = await asyncpg.connect(dsn)
        try:
            owner = await new_owner(conn)
            slow = await _model(conn, token_delay_ms=50)
            watcher = ChatWatcher(watch_conn)
            latencies_ms: list[float] = []
            for _ in range(FAILOVER_ROUNDS):
                chat_id = uuid.uuid4()
                first_owner: dict[str, object] = {}
                started = await watcher.expect(chat_id, _first_running(first_owner))
                await insert_chats(conn, owner, [chat_id], LONG_TEXT, slow)
                await asyncio.wait_for(started, 30)
                await watcher.done(chat_id)
                owner_pid = await conn.fetchval(
                    "SELECT pid FROM chat_replicas WHERE id = $1::uuid",
                    str(first_owner["worker_id"]),
                )
                victim = next(
                    r for r in running_replicas if r.process and r.process.pid == owner_pid
                )
                resumed = await watcher.expect(chat_id, _running_elsewhere(first_owner))
                victim.signal(signal.SIGKILL)
                killed_at = time.perf_counter()
                latencies_ms.append((await asyncio.wait_for(resumed, 30) - killed_at) * 1000)
                await watcher.done(chat_id)
                await conn.execute(
                    "UPDATE chats SET archived = true, status = 'waiting', worker_id = NULL"
                    " WHERE id = $1",
                    chat_id,
                )
                await victim.wait_exit()
                victim.start()
                await victim.wait_healthy(timeout_s=60)
            result.add("failover_p50_ms", percentile(latencies_ms, 50), "ms")
            result.add("failover_p99_ms", percentile(latencies_ms, 99), "ms")
        finally:
            await conn.close()
            await watch_conn.close()
