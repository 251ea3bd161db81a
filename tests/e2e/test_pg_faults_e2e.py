"""Issue 9's acceptance: PostgreSQL goes away under 30 streaming chats on 2 real `chatd serve`
replicas, and every promise holds anyway.

- a FAST restart (`pg_ctl restart -m fast`: a minor upgrade, a managed failover);
- a CRASH restart (`pg_ctl stop -m immediate` + start: crash recovery empties the UNLOGGED
  `chat_stream_parts` and resets its ids);
- a FAILOVER: the primary's host dies (`pg_ctl stop -m immediate`) and its synchronous standby
  is promoted; the replicas name both hosts (`postgresql://h1,h2/db?target_session_attrs=
  read-write`) and follow the new primary;
- a 10 s BLACK HOLE between the replicas and PostgreSQL (a TcpProxy in front of the server),
  after which the black-holed connections either stay dead (a NAT lost their state) or resume
  with everything held back delivered late (TCP after a short partition: queries the replica
  gave up on still run and commit).

Each test runs on a PostgreSQL server of its own (tests/faults/pg_cluster.py; the suite's shared
server is never restarted). The builtin echo model answers word by word, slowly enough that every
chat is mid-answer when the fault strikes. Every chat has one SSE client, connected before the
fault, which reconnects with `Last-Event-ID` after every disconnect (tests/faults/sse.py).

The promise checked after each fault: no replica exits, no chat ends in `error`, every chat ends
`waiting` with exactly one complete answer (the expected echo text, once), and every client
assembled exactly the persisted answer, its live text never having a gap or a duplicate."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from app.http.auth import create_token
from tests import engine_harness, factories
from tests.conditions import wait_for
from tests.e2e.replicas import ReplicaProcess
from tests.faults.pg_cluster import PgCluster
from tests.faults.sse import ResumingSseClient
from tests.faults.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

CHATS = 30
USERS = 3  # 10 chats each: under the per-user limits on running and pending chats
WORDS = 50
# 50 words at 150 ms: ~7.5 s per answer, so every chat is mid-answer at the fault and, when a
# run is requeued after it, the answer streams again long after recovery.
TOKEN_DELAY_MS = 150
ENV = engine_harness.FAST_ENV | {"CHATD_KEEPALIVE_INTERVAL_S": "1", "CHATD_LOG_LEVEL": "INFO"}
BLACKHOLE_S = 10.0
FOLLOW_TIMEOUT_S = 40.0  # from the fault to every client's end of turn


def _question(index: int) -> str:
    return f"chat{index} " + " ".join(f"w{index}x{n}" for n in range(WORDS))


def _answer(question: str) -> str:
    return "echo: " + question


# --------------------------------------------------------------------------------------------
# The database, read from the test (fresh connections: the server restarts under us).


async def _query(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return list(await conn.fetch(sql, *args, timeout=10))
    finally:
        await conn.close()


@dataclass
class Chat:
    id: str
    question: str
    headers: dict[str, str]


@dataclass
class Stage:
    log_dir: Path
    cluster: PgCluster
    replicas: list[ReplicaProcess]
    session: aiohttp.ClientSession
    chats: list[Chat]
    clients: list[ResumingSseClient]
    tasks: list[asyncio.Task[Any]]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def diagnosis(self) -> str:
        """What a failure report needs: replica exits, error lines of the logs, client stats."""
        lines = []
        for replica in self.replicas:
            assert replica.process is not None
            code = replica.process.poll()
            lines.append(f"--- replica {replica.name}: {'running' if code is None else code}")
            interesting = [
                line
                for line in replica.logs().splitlines()
                if re.search(r"error|exception|traceback|exit|fatal|warn", line, re.I)
            ]
            lines.extend(line[:400] for line in interesting[-25:])
        stuck = [
            (c.chat_id[:8], c.view.status, c.connections, c.attempts, c.disconnects[-2:])
            for c in self.clients
            if c.view.status != "waiting"
        ]
        lines.append(f"--- clients not done ({len(stuck)}): {stuck[:10]}")
        transcripts = self.log_dir / "sse-clients"
        transcripts.mkdir(exist_ok=True)
        for client in self.clients:
            (transcripts / f"{client.chat_id}.log").write_text(client.transcript())
        lines.append(f"--- every client's events: {transcripts}")
        return "\n".join(lines)


async def _settle_clients(stage: Stage, timeout_s: float) -> None:
    """Until every client saw its chat end its turn; fails early when a replica exits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = set(stage.tasks)
    while pending:
        for replica in stage.replicas:
            assert replica.process is not None
            if replica.process.poll() is not None:
                raise AssertionError(f"replica {replica.name} exited\n{stage.diagnosis()}")
        if loop.time() > deadline:
            raise AssertionError(f"clients still following after {timeout_s}s\n{stage.diagnosis()}")
        # A wait on the tasks themselves, bounded so the replica check above runs often.
        _done, pending = await asyncio.wait(pending, timeout=0.2)
    for task in stage.tasks:
        task.result()  # a client's own failure (e.g. a 4xx) surfaces here


async def _mid_answer(stage: Stage, parts: int = 3) -> None:
    """Every client is receiving its answer live."""

    def all_streaming() -> bool:
        for replica in stage.replicas:
            assert replica.process is not None
            assert replica.process.poll() is None, stage.diagnosis()
        return all(
            sum(1 for e in c.events if e.data["type"] == "message_part") >= parts
            for c in stage.clients
        )

    await wait_for(all_streaming, timeout_s=30, interval_s=0.05, message="every chat mid-answer")


def _drop_half_the_clients(stage: Stage) -> None:
    """Every other client loses its connection now and resumes with Last-Event-ID (on the next
    replica): the protocol must serve resuming clients as well as the ones that stayed."""
    for client in stage.clients[::2]:
        client.drop_connection()


async def _check_promises(stage: Stage) -> None:
    for replica in stage.replicas:
        assert replica.process is not None
        assert replica.process.poll() is None, f"replica {replica.name} exited"
    chat_ids = [uuid.UUID(c.id) for c in stage.chats]
    statuses = {
        str(row["id"]): (row["status"], row["last_error"])
        for row in await _query(
            stage.cluster.dsn,
            "SELECT id, status, last_error FROM chats WHERE id = ANY($1)",
            chat_ids,
        )
    }
    not_waiting = {k[:8]: v for k, v in statuses.items() if v[0] != "waiting"}
    assert not not_waiting, f"chats not waiting: {not_waiting}\n{stage.diagnosis()}"

    rows = await _query(
        stage.cluster.dsn,
        """
        SELECT chat_id, role, content FROM chat_messages
        WHERE chat_id = ANY($1) AND NOT deleted ORDER BY chat_id, id
        """,
        chat_ids,
    )
    history: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        history.setdefault(str(row["chat_id"]), []).append(
            (row["role"], engine_harness.text_of(json.loads(row["content"])))
        )
    wrong = {
        chat.id[:8]: history.get(chat.id)
        for chat in stage.chats
        if history.get(chat.id) != [("user", chat.question), ("assistant", _answer(chat.question))]
    }
    assert not wrong, f"{len(wrong)} chats without exactly one complete answer: {wrong}"

    for chat, client in zip(stage.chats, stage.clients, strict=True):
        assert client.view.duplicates == [], f"{chat.id}: messages delivered twice"
        assert client.prefix_violations == [], (
            f"{chat.id}: live parts with a gap or a duplicate: {client.prefix_violations[:3]}"
            f"\n{stage.diagnosis()}"
        )
        persisted = [text for role, text in history[chat.id] if role == "assistant"]
        assert client.view.texts("assistant") == persisted, (
            f"{chat.id}: the client assembled {client.view.texts('assistant')}"
        )


@asynccontextmanager
async def _stage(tmp_path: Path, cluster: PgCluster, replica_dsn: str) -> AsyncIterator[Stage]:
    """2 replicas on `replica_dsn`, 30 chats over 3 users, one resuming SSE client per chat."""
    pool = await asyncpg.create_pool(cluster.dsn, min_size=1, max_size=2)
    try:
        headers = [
            {"Authorization": f"Bearer {await create_token(pool, f'fault-{n}')}"}
            for n in range(USERS)
        ]
        model = await factories.create_model_config(pool, token_delay_ms=TOKEN_DELAY_MS)
    finally:
        await pool.close()
    replicas = [
        ReplicaProcess(log_dir=tmp_path, name=name, env={"DATABASE_URL": replica_dsn} | ENV)
        for name in ("a", "b")
    ]
    tasks: list[asyncio.Task[Any]] = []
    try:
        for replica in replicas:
            replica.start()
        await asyncio.gather(*(r.wait_healthy(timeout_s=30) for r in replicas))
        async with aiohttp.ClientSession() as session:
            chats = []
            for index in range(CHATS):
                chat_headers = headers[index % USERS]
                question = _question(index)
                async with session.post(
                    replicas[index % 2].url + "/api/v1/chats",
                    json={"content": question, "model_config_id": str(model)},
                    headers=chat_headers,
                ) as response:
                    assert response.status == 201, await response.text()
                    chat_id = str((await response.json())["id"])
                chats.append(Chat(chat_id, question, chat_headers))
            clients = [
                ResumingSseClient(
                    session,
                    [r.url for r in replicas],
                    chat.id,
                    chat.headers,
                    expected_answer=_answer(chat.question),
                    first_url=index,
                )
                for index, chat in enumerate(chats)
            ]
            tasks = [
                asyncio.create_task(client.run(timeout_s=90), name=f"sse-{client.chat_id[:8]}")
                for client in clients
            ]
            yield Stage(tmp_path, cluster, replicas, session, chats, clients, tasks)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for replica in replicas:
            replica.kill()


async def test_fast_restart_under_30_streaming_chats_keeps_every_promise(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    async with _stage(tmp_path, pg_cluster, pg_cluster.dsn) as stage:
        await _mid_answer(stage)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await pg_cluster.restart_fast()
        print(f"\nfast restart took {loop.time() - started:.2f}s")
        _drop_half_the_clients(stage)
        await _settle_clients(stage, FOLLOW_TIMEOUT_S)
        print(f"every client done {loop.time() - started:.2f}s after the restart began")
        print(
            "reconnections per client:",
            sorted(c.connections - 1 for c in stage.clients),
        )
        await _check_promises(stage)


async def test_crash_restart_under_30_streaming_chats_keeps_every_promise(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    async with _stage(tmp_path, pg_cluster, pg_cluster.dsn) as stage:
        await _mid_answer(stage)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await pg_cluster.crash_restart()
        recovered = loop.time()
        print(f"\ncrash restart (immediate stop + recovery) took {recovered - started:.2f}s")
        _drop_half_the_clients(stage)
        await _settle_clients(stage, FOLLOW_TIMEOUT_S)
        print(f"every client done {loop.time() - started:.2f}s after the crash")
        await _check_promises(stage)
        # Live parts kept reaching every client after recovery (not only the final message).
        starved = [c.chat_id[:8] for c in stage.clients if c.parts_after(recovered) == 0]
        assert not starved, f"{len(starved)} clients got no live part after recovery: {starved}"


@pytest.mark.parametrize(
    "resume",
    [
        pytest.param(False, id="connections-lost"),  # the black-holed connections stay dead
        pytest.param(True, id="connections-resume"),  # TCP delivers what was held back, late
    ],
)
async def test_a_10s_black_hole_between_replicas_and_postgres_keeps_every_promise(
    tmp_path: Path, pg_cluster: PgCluster, resume: bool
) -> None:
    async with TcpProxy(pg_cluster.host, pg_cluster.port) as proxy:
        replica_dsn = pg_cluster.dsn_via(proxy.host, proxy.port)
        async with _stage(tmp_path, pg_cluster, replica_dsn) as stage:
            await _mid_answer(stage)
            loop = asyncio.get_running_loop()
            proxy.blackhole()
            noticed = await _readiness_lost_during(stage, BLACKHOLE_S)
            proxy.heal(resume=resume)
            healed = loop.time()
            _drop_half_the_clients(stage)
            print(f"\nreplicas noticed the black hole after {noticed} s; healed at 10 s")
            missing = [name for name, at in noticed.items() if at is None]
            assert not missing, (
                f"replicas {missing} still answered /readyz 200 after {BLACKHOLE_S}s of black"
                f" hole\n{stage.diagnosis()}"
            )
            await asyncio.gather(*(r.wait_healthy(timeout_s=30) for r in stage.replicas))
            print(f"replicas ready again {loop.time() - healed:.2f}s after the heal")
            await _settle_clients(stage, FOLLOW_TIMEOUT_S)
            print(f"every client done {loop.time() - healed:.2f}s after the heal")
            await _check_promises(stage)


async def _readiness_lost_during(stage: Stage, duration_s: float) -> dict[str, float | None]:
    """Poll every replica's /readyz for `duration_s` (the length of the fault, not a wait for a
    condition); when did each first answer anything but 200 (503, or no answer in time)?"""
    loop = asyncio.get_running_loop()
    started = loop.time()
    noticed: dict[str, float | None] = {r.name: None for r in stage.replicas}

    async def probe(replica: ReplicaProcess) -> None:
        while loop.time() - started < duration_s:
            ok = False
            try:
                async with asyncio.timeout(3):
                    async with stage.session.get(replica.url + "/readyz") as response:
                        ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if not ok and noticed[replica.name] is None:
                noticed[replica.name] = round(loop.time() - started, 2)
            await asyncio.sleep(0.1)  # the probe's period

    await asyncio.gather(*(probe(r) for r in stage.replicas))
    return noticed


async def test_failover_to_a_synchronous_standby_under_30_streaming_chats_keeps_every_promise(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    standby = await pg_cluster.create_standby(synchronous=True)
    try:
        both_hosts = (
            f"postgresql://postgres@{pg_cluster.host}:{pg_cluster.port},"
            f"{standby.host}:{standby.port}/chatd?target_session_attrs=read-write"
        )
        async with _stage(tmp_path, pg_cluster, both_hosts) as stage:
            await _mid_answer(stage)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await pg_cluster.stop(mode="immediate")  # the primary's host is gone
            await standby.promote()
            print(f"\nprimary gone and standby promoted in {loop.time() - started:.2f}s")
            stage.cluster = standby
            _drop_half_the_clients(stage)
            await _settle_clients(stage, FOLLOW_TIMEOUT_S)
            print(f"every client done {loop.time() - started:.2f}s after the primary died")
            await _check_promises(stage)
    finally:
        await standby.destroy()
