"""The run under hostile output and repeated failure (issue 9): NUL and lone surrogates from the
model and from tools are stored as U+FFFD, a chat that crashes every run it gets ends in `error`
(the poison-chat guard), and one replica running two generations of the same chat keeps them
apart."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from app.engine import chatloop
from app.providers.base import (
    ModelRequest,
    Provider,
    StepFinished,
    StreamEvent,
    TextDelta,
    ToolCall,
    Usage,
)
from app.providers.retry import RetryInfo
from app.state import chats, runs
from app.state.runs import RunToken
from app.tools.registry import Tool, ToolContext, ToolRegistry
from tests import engine_harness, factories
from tests.faults.pg_cluster import PgCluster

HOSTILE_TEXT = "nul\x00 and lone \ud800 surrogate \udfff end"
SAFE_TEXT = "nul\ufffd and lone \ufffd surrogate \ufffd end"


def _hostile_model() -> Callable[..., AsyncIterator[StreamEvent]]:
    """A model whose text deltas and tool-call arguments carry NUL and lone surrogates: it calls
    `echo_args` once, then answers."""

    async def stream(
        provider: Provider,
        request: ModelRequest,
        *,
        on_retry: Callable[[RetryInfo], Awaitable[None]],
    ) -> AsyncIterator[StreamEvent]:
        if not any(m.role == "tool" for m in request.messages):
            yield TextDelta(HOSTILE_TEXT[:10])
            yield TextDelta(HOSTILE_TEXT[10:])
            yield ToolCall(
                id="call\x00one",
                name="echo_args",
                args={"key\x00": "value \udc80", "list": ["\x00", "\ud83d"]},
            )
            yield StepFinished("tool_use", Usage(10, 5))
        else:
            yield TextDelta("done\x00")
            yield StepFinished("end_turn", Usage(12, 2))

    return stream


async def _echo_args(args: dict[str, Any], _context: ToolContext) -> dict[str, Any]:
    return {"got": args, "note": "tool output with a NUL\x00 and a \udfff"}


async def test_nul_and_lone_surrogates_from_model_and_tools_become_replacement_characters(
    database_url: str, pool: asyncpg.Pool
) -> None:
    tools = ToolRegistry([Tool("echo_args", "echoes", {"type": "object"}, _echo_args)])
    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(
        database_url, pool, stream_step=_hostile_model(), tools=tools
    ) as replica:
        chat, _ = await chats.create_chat(pool, owner, "say something hostile")
        final = await engine_harness.wait_status(pool, chat.id, "waiting", "error")
    assert final.status == "waiting", final.last_error
    assert final.generation == 1  # answered by its first run: never requeued
    history = await engine_harness.history(pool, chat.id)
    assert [role for role, _ in history] == ["user", "assistant", "tool", "assistant"]
    text, call = history[1][1]
    assert text == {"type": "text", "text": SAFE_TEXT}
    safe_args = {"key\ufffd": "value \ufffd", "list": ["\ufffd", "\ufffd"]}
    assert call == {
        "type": "tool_call",
        "id": "call\ufffdone",
        "name": "echo_args",
        "args": safe_args,
    }
    assert history[2][1] == [
        {
            "type": "tool_result",
            "tool_call_id": "call\ufffdone",
            "name": "echo_args",
            "result": {"got": safe_args, "note": "tool output with a NUL\ufffd and a \ufffd"},
            "is_error": False,
        }
    ]
    assert engine_harness.text_of(history[3][1]) == "done\ufffd"
    # The live parts went through too: nothing refused, nothing retried.
    stats = replica.flusher.stats
    assert stats.parts_written >= 3
    assert (stats.failures, stats.parts_rejected, stats.parts_discarded) == (0, 0, 0)
    assert replica.stats.run_crashes == 0


async def test_a_chat_whose_run_crashes_every_time_ends_in_error_after_bounded_tries(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async def buggy(
        provider: Provider,
        request: ModelRequest,
        *,
        on_retry: Callable[[RetryInfo], Awaitable[None]],
    ) -> AsyncIterator[StreamEvent]:
        yield TextDelta("about to crash")
        raise KeyError("a bug in the run")

    owner = await factories.create_owner(pool)
    async with engine_harness.running_replica(
        database_url, pool, stream_step=buggy, max_failed_runs=3
    ) as replica:
        chat, _ = await chats.create_chat(pool, owner, "crash me")
        final = await engine_harness.wait_status(pool, chat.id, "error")

        # The last run's parts go with the failure. A flush that read the row just before the
        # failure committed may still land one part after it: such a part is never streamed
        # (the chat is not running) and the replica's janitor removes it.
        async def no_parts_left() -> bool:
            return await engine_harness.parts_of(pool, chat.id) == []

        await engine_harness.eventually(no_parts_left, message="the failed run's parts gone")
    assert final.generation == 3  # three acquisitions, three crashed runs, then it stopped
    assert final.last_error is not None
    assert final.last_error["kind"] == "poison"
    assert final.last_error["retryable"] is False
    assert "3 acquisitions" in final.last_error["message"]
    assert "KeyError" not in str(final.last_error)  # no exception text for the user
    assert replica.stats.run_crashes == 3
    assert replica.stats.run_ends == {"requeued": 2, "failed": 1}
    assert await pool.fetchval("SELECT failed_runs FROM chats WHERE id = $1", chat.id) == 0


async def test_the_poison_count_restarts_when_a_run_makes_progress(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    worker = uuid.uuid4()
    chat = await factories.create_chat(conn, status="pending")
    for expected in (1, 2):
        (acquired,) = await runs.acquire(pool, worker, 1)
        released = await runs.give_back_failed(pool, runs.token_of(acquired), max_failed_runs=3)
        assert released.status == "pending"
        assert await conn.fetchval("SELECT failed_runs FROM chats WHERE id = $1", chat["id"]) == (
            expected
        )
    (acquired,) = await runs.acquire(pool, worker, 1)
    await runs.persist_step(
        pool,
        runs.token_of(acquired),
        runs.StepRecord([{"type": "text", "text": "progress"}]),
        model_config_id=None,
    )
    assert await conn.fetchval("SELECT failed_runs FROM chats WHERE id = $1", chat["id"]) == 0
    # Three more failures are needed now, not one.
    released = await runs.give_back_failed(pool, runs.token_of(acquired), max_failed_runs=3)
    assert (released.status, released.generation) == ("pending", 3)


async def test_a_chat_that_kills_every_replica_running_it_ends_in_error(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    dead_worker = uuid.uuid4()
    doomed = await factories.create_chat(conn, status="running", worker_id=dead_worker)
    fine = await factories.create_chat(conn, status="running", worker_id=dead_worker)
    await conn.execute("UPDATE chats SET failed_runs = 2 WHERE id = $1", doomed["id"])
    async with conn.transaction():
        handed_on = await runs.requeue_orphans(
            conn, [dead_worker], orphan_grace_s=60, max_failed_runs=3
        )
    by_id = {chat.id: chat for chat in handed_on}
    poisoned = by_id[doomed["id"]]
    assert poisoned.status == "error"
    assert poisoned.last_error is not None
    assert poisoned.last_error["kind"] == "poison"
    assert by_id[fine["id"]].status == "pending"
    assert await conn.fetchval("SELECT failed_runs FROM chats WHERE id = $1", fine["id"]) == 1


async def test_a_run_that_died_with_the_database_server_does_not_count_toward_poison(
    pg_cluster: PgCluster,
) -> None:
    # A restart (or crash) of PostgreSQL ends every session, so every replica's lock is free and
    # the sweepers requeue all running chats: an outage, which says nothing about the chats.
    conn = await asyncpg.connect(pg_cluster.dsn)
    try:
        dead_worker = uuid.uuid4()
        before = await factories.create_chat(conn, status="running", worker_id=dead_worker)
    finally:
        await conn.close()
    await pg_cluster.restart_fast()
    conn = await asyncpg.connect(pg_cluster.dsn)
    try:
        after = await factories.create_chat(conn, status="running", worker_id=dead_worker)
        async with conn.transaction():
            handed_on = await runs.requeue_orphans(
                conn, [dead_worker], orphan_grace_s=60, max_failed_runs=3
            )
        assert {chat.id for chat in handed_on} == {before["id"], after["id"]}
        failed_runs = {
            row["id"]: row["failed_runs"]
            for row in await conn.fetch("SELECT id, failed_runs FROM chats")
        }
    finally:
        await conn.close()
    assert failed_runs[before["id"]] == 0  # it died with the server
    assert failed_runs[after["id"]] == 1  # its replica died while the server was up


async def test_one_replica_runs_two_generations_of_a_chat_apart(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """After an edit, the old run's tool is slow to stop and the same replica re-acquires the
    chat: both runs are live (capacity counts both) and each one's parts are its own."""
    started = asyncio.Event()
    let_go = asyncio.Event()

    async def slow_to_stop(_args: dict[str, object], _context: ToolContext) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # E.g. a subprocess that takes its time to exit, whatever is cancelled meanwhile.
            while not let_go.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(let_go.wait())
            raise
        return "never"

    tools = ToolRegistry([Tool("slow_to_stop", "slow", {"type": "object"}, slow_to_stop)])
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=20)
    async with engine_harness.running_replica(
        database_url, pool, tools=tools, max_concurrent_runs=3
    ) as replica:
        chat, message = await chats.create_chat(
            pool, owner, "/tool slow_to_stop {}", model_config_id=slow
        )
        await asyncio.wait_for(started.wait(), 10)
        await chats.edit_message(pool, owner, chat.id, message.id, "one two three four five six")

        def both_generations_live() -> bool:
            return {token.generation for token in replica.runs} == {1, 2}

        await engine_harness.eventually(
            lambda: asyncio.sleep(0, both_generations_live()), message="two live generations"
        )
        assert replica.spare_capacity == 1
        old = RunToken(chat.id, replica.id, 1)
        new = RunToken(chat.id, replica.id, 2)
        assert replica.runs[old][0].token == old
        assert replica.runs[new][0].token == new

        # The new run streams while the old one is still stopping.
        async def new_run_streams() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM chat_stream_parts WHERE chat_id = $1 AND generation = 2",
                    chat.id,
                )
            )

        await engine_harness.eventually(new_run_streams, message="live parts of generation 2")
        let_go.set()
        final = await engine_harness.wait_status(pool, chat.id, "waiting")
        await engine_harness.eventually(
            lambda: asyncio.sleep(0, not replica.runs), message="both runs to end"
        )
    assert final.generation == 2
    assert replica.stats.run_ends == {"lost": 1, "waiting": 1}
    assert [
        (r, engine_harness.text_of(c)) for r, c in await engine_harness.history(pool, chat.id)
    ] == [
        ("user", "one two three four five six"),
        ("assistant", "echo: one two three four five six"),
    ]
    # The old run's end dropped nothing of the new run's parts.
    assert replica.flusher.stats.parts_discarded == 0


async def test_a_stalled_resync_read_gives_the_chat_back_instead_of_wedging_the_run(
    database_url: str, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setattr(chatloop, "RESYNC_READ_TIMEOUT_S", 0.2)
    monkeypatch.setattr(chatloop, "RESYNC_GIVE_UP_S", 1.0)
    owner = await factories.create_owner(pool)
    slow = await factories.create_model_config(pool, token_delay_ms=50)
    text = " ".join(f"w{i}" for i in range(40))
    async with engine_harness.running_replica(database_url, pool) as replica:
        chat, _ = await chats.create_chat(pool, owner, text, model_config_id=slow)
        await engine_harness.wait_parts(pool, chat.id, at_least=1)
        blocker = await asyncpg.connect(database_url)
        try:
            async with blocker.transaction():
                # The database stalls for the run's re-read of its chat row...
                await blocker.execute("LOCK TABLE chats IN ACCESS EXCLUSIVE MODE")
                # ... which a listener reconnect (Resync) asks for.
                await pool.execute(
                    "SELECT pg_terminate_backend($1)", replica.listener.backend_pid()
                )
                await engine_harness.eventually(
                    lambda: asyncio.sleep(
                        0, any("run.watch_failed" in r.getMessage() for r in caplog.records)
                    ),
                    message="the run's resync read to give up",
                )
        finally:
            await blocker.close()
        final = await engine_harness.wait_status(pool, chat.id, "waiting", timeout_s=30)
    # The first run gave the chat back; the second answered it.
    assert final.generation == 2
    assert [
        (r, engine_harness.text_of(c)) for r, c in await engine_harness.history(pool, chat.id)
    ] == [
        ("user", text),
        ("assistant", "echo: " + text),
    ]
