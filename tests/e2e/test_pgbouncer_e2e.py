"""chatd behind PgBouncer in transaction mode: the pool goes through the pooler, while the
listener, the liveness lock and migrations connect directly (CHATD_DIRECT_DATABASE_URL), as
docs/operations.md says to run it. Two real replicas answer 20 chats streamed over SSE, and
PgBouncer's own statistics show that the pool's transactions went through it.

In transaction mode consecutive transactions of one client connection run on different server
sessions: a named prepared statement made in one is unknown in the next (PgBouncer 1.18 does
not track them), and startup parameters are refused. The test fails on either."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from app.http.auth import create_token
from tests import engine_harness, factories
from tests.e2e.replicas import ReplicaProcess
from tests.faults.pg_cluster import PgCluster
from tests.faults.pgbouncer import PgBouncer, pgbouncer_binary

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        pgbouncer_binary() is None,
        reason="pgbouncer is not installed (.ci/run installs it: apt-get install pgbouncer)",
    ),
]

CHATS = 20


async def _stream_answer(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str:
    """The assistant's answer as an SSE client assembles it, once the chat is waiting again."""
    text = ""
    async with session.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        event = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if event == "message" and data["message"]["role"] == "assistant":
                    text = engine_harness.text_of(data["message"]["content"])
                if event == "status" and data["status"] == "waiting" and text:
                    return text
    raise AssertionError("the stream ended before the answer")


async def test_replicas_behind_pgbouncer_in_transaction_mode_answer_every_chat_once(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    bouncer = PgBouncer(pg_cluster)
    await bouncer.start()
    try:
        pool = await asyncpg.create_pool(pg_cluster.dsn, min_size=1, max_size=2)
        try:
            token = await create_token(pool, "bouncer")
            model = await factories.create_model_config(pool, token_delay_ms=20)
        finally:
            await pool.close()
        env = engine_harness.FAST_ENV | {
            "DATABASE_URL": bouncer.dsn,
            "CHATD_DIRECT_DATABASE_URL": pg_cluster.dsn,
        }
        replicas = [ReplicaProcess(log_dir=tmp_path, name=n, env=env) for n in ("a", "b")]
        before = await bouncer.transactions_served()
        try:
            for replica in replicas:
                replica.start()
            await asyncio.gather(*(r.wait_healthy(timeout_s=60) for r in replicas))
            headers = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
                chat_ids = []
                for index in range(CHATS):
                    async with session.post(
                        replicas[index % 2].url + "/api/v1/chats",
                        json={"content": f"question {index} a b c", "model_config_id": str(model)},
                        headers=headers,
                    ) as response:
                        assert response.status == 201, await response.text()
                        chat_ids.append((await response.json())["id"])
                answers = await asyncio.gather(
                    *(
                        _stream_answer(
                            session,
                            f"{replicas[(i + 1) % 2].url}/api/v1/chats/{chat_id}/stream",
                            headers,
                        )
                        for i, chat_id in enumerate(chat_ids)
                    )
                )
            assert answers == [f"echo: question {i} a b c" for i in range(CHATS)]
        finally:
            for replica in replicas:
                replica.kill()
        conn = await asyncpg.connect(pg_cluster.dsn)
        try:
            histories = await conn.fetch(
                """
                SELECT chat_id, array_agg(role ORDER BY id) AS roles FROM chat_messages
                WHERE NOT deleted GROUP BY chat_id
                """
            )
        finally:
            await conn.close()
        assert len(histories) == CHATS
        assert all(list(row["roles"]) == ["user", "assistant"] for row in histories)
        served = await bouncer.transactions_served() - before
        # Every turn is several pool transactions (acquire, persist, end of turn, the API's).
        assert served >= CHATS * 3, f"only {served} transactions went through PgBouncer"
        for replica in replicas:
            assert "prepared statement" not in replica.logs()
    finally:
        await bouncer.stop()
