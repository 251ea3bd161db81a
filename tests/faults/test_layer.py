"""The fault-injection layer does what it says: the proxy forwards, cuts and black-holes; the
dedicated server restarts fast and crash-restarts (UNLOGGED tables come back empty); a chat row
lock blocks writers of that row."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests import factories
from tests.conditions import wait_for
from tests.faults.chat_lock import chat_row_locked, lock_waiters
from tests.faults.pg_cluster import PgCluster
from tests.faults.tcp_proxy import TcpProxy

# What a client sees when its connection is reset under it.
CONNECTION_ERRORS = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)


async def test_the_proxy_forwards_queries_and_counts_connections(
    pg_cluster: PgCluster, pg_proxy: TcpProxy
) -> None:
    dsn = pg_cluster.dsn_via(pg_proxy.host, pg_proxy.port)
    conns = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        assert [await c.fetchval("SELECT $1::int + 1", i) for i, c in enumerate(conns)] == [1, 2, 3]
        assert pg_proxy.accepted == 3 and pg_proxy.open_connections == 3
        # A large payload crosses intact (many reads and writes of the pumps).
        assert await conns[0].fetchval("SELECT length(repeat('x', 5000000))") == 5_000_000
        big = await conns[0].fetchval("SELECT repeat('ab', 1000000)")
        assert big == "ab" * 1_000_000
    finally:
        for c in conns:
            await c.close()
    await wait_for(lambda: pg_proxy.open_connections == 0, message="connections closed")


async def test_cut_resets_every_connection_and_new_ones_work(
    pg_cluster: PgCluster, pg_proxy: TcpProxy
) -> None:
    dsn = pg_cluster.dsn_via(pg_proxy.host, pg_proxy.port)
    idle = await asyncpg.connect(dsn)
    busy = await asyncpg.connect(dsn)
    try:
        sleeping = asyncio.create_task(busy.fetchval("SELECT pg_sleep(30)"))
        await wait_for(
            lambda: idle.fetchval(
                "SELECT count(*) = 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
            ),
            message="the sleeping query runs",
        )
        idle_pid = idle.get_server_pid()
        assert pg_proxy.cut() == 2
        with pytest.raises(CONNECTION_ERRORS):
            async with asyncio.timeout(10):
                await sleeping
        with pytest.raises(CONNECTION_ERRORS):
            await idle.fetchval("SELECT 1", timeout=10)
        # The server got the reset too: the idle backend ended. (A backend busy in a query
        # notices only when it next talks to its client, as with a real network.)
        fresh = await asyncpg.connect(dsn, timeout=10)
        try:
            assert await fresh.fetchval("SELECT 1") == 1
            await wait_for(
                lambda: fresh.fetchval(
                    "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", idle_pid
                ),
                message="the cut idle backend ended",
            )
        finally:
            await fresh.close()
    finally:
        idle.terminate()
        busy.terminate()


async def test_blackhole_silences_open_and_new_connections_until_a_deadline(
    pg_cluster: PgCluster, pg_proxy: TcpProxy
) -> None:
    dsn = pg_cluster.dsn_via(pg_proxy.host, pg_proxy.port)
    victim = await asyncpg.connect(dsn)
    direct = await asyncpg.connect(pg_cluster.dsn)
    try:
        victim_pid = victim.get_server_pid()
        pg_proxy.blackhole()
        with pytest.raises(TimeoutError):
            await victim.fetchval("SELECT 1", timeout=0.5)
        with pytest.raises(TimeoutError):
            await asyncpg.connect(dsn, timeout=0.5)
        assert pg_proxy.accepted >= 2  # the new connection was accepted, never answered
        assert pg_proxy.forwarded == 1

        pg_proxy.heal()
        fresh = await asyncpg.connect(dsn, timeout=10)
        try:
            assert await fresh.fetchval("SELECT 1") == 1
        finally:
            await fresh.close()
        # The black-holed connection stays silent after the heal; its backend lives on until
        # the client closes it (its close reaches the server once the path is back).
        assert await direct.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", victim_pid
        )
        victim.terminate()
        await wait_for(
            lambda: direct.fetchval(
                "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", victim_pid
            ),
            message="the closed black-holed connection's backend ended",
        )
    finally:
        victim.terminate()
        await direct.close()


async def test_a_resumed_black_hole_delivers_what_was_held_back(
    pg_cluster: PgCluster, pg_proxy: TcpProxy
) -> None:
    dsn = pg_cluster.dsn_via(pg_proxy.host, pg_proxy.port)
    conn = await asyncpg.connect(dsn)
    try:
        pg_proxy.blackhole()
        query = asyncio.create_task(conn.fetchval("SELECT 41 + 1"))
        connecting = asyncio.create_task(asyncpg.connect(dsn))
        # Nothing gets through for a while (absence of progress needs a window to be seen).
        done, _ = await asyncio.wait({query, connecting}, timeout=0.5)
        assert not done
        pg_proxy.heal(resume=True)
        async with asyncio.timeout(10):
            assert await query == 42
            late = await connecting
        try:
            assert await late.fetchval("SELECT 1") == 1
        finally:
            await late.close()
    finally:
        await conn.close()


async def test_fast_restart_ends_sessions_and_keeps_data(pg_cluster: PgCluster) -> None:
    conn = await asyncpg.connect(pg_cluster.dsn)
    try:
        chat = await factories.create_chat(conn)
        await pg_cluster.restart_fast()
        with pytest.raises(CONNECTION_ERRORS):
            await conn.fetchval("SELECT 1", timeout=10)
    finally:
        conn.terminate()
    conn = await asyncpg.connect(pg_cluster.dsn, timeout=10)
    try:
        assert await conn.fetchval("SELECT count(*) FROM chats WHERE id = $1", chat["id"]) == 1
    finally:
        await conn.close()
    assert pg_cluster.restarts == 1


async def test_crash_restart_empties_unlogged_tables_and_resets_their_sequences(
    pg_cluster: PgCluster,
) -> None:
    conn = await asyncpg.connect(pg_cluster.dsn)
    try:
        chat = await factories.create_chat(conn)
        await factories.create_stream_part(conn, chat_id=chat["id"])
        # A probe of our own: the product may choose how chat_stream_parts' ids are made.
        await conn.execute("CREATE UNLOGGED TABLE fault_probe (id bigserial, value int)")
        probe_ids = await conn.fetch("INSERT INTO fault_probe (value) VALUES (1), (2) RETURNING id")
        await pg_cluster.crash_restart()
        with pytest.raises(CONNECTION_ERRORS):
            await conn.fetchval("SELECT 1", timeout=10)
    finally:
        conn.terminate()
    conn = await asyncpg.connect(pg_cluster.dsn, timeout=10)
    try:
        assert await conn.fetchval("SELECT count(*) FROM chats WHERE id = $1", chat["id"]) == 1
        assert await conn.fetchval("SELECT count(*) FROM chat_stream_parts") == 0
        assert await conn.fetchval("SELECT count(*) FROM fault_probe") == 0
        new_id = await conn.fetchval("INSERT INTO fault_probe (value) VALUES (3) RETURNING id")
        assert new_id == probe_ids[0]["id"], "the sequence of an UNLOGGED table restarts"
    finally:
        await conn.close()


async def test_stop_and_start(pg_cluster: PgCluster) -> None:
    await pg_cluster.stop()
    with pytest.raises(CONNECTION_ERRORS):
        await asyncpg.connect(pg_cluster.dsn, timeout=5)
    await pg_cluster.start()
    conn = await asyncpg.connect(pg_cluster.dsn, timeout=10)
    await conn.close()


async def test_a_held_chat_row_lock_blocks_writers_of_that_row(
    database_url: str, conn: asyncpg.Connection
) -> None:
    chat = await factories.create_chat(conn)
    other = await factories.create_chat(conn)
    async with chat_row_locked(database_url, chat["id"]) as holder:
        with pytest.raises(asyncpg.LockNotAvailableError):
            await conn.execute("SELECT 1 FROM chats WHERE id = $1 FOR SHARE NOWAIT", chat["id"])
        await conn.execute("SELECT 1 FROM chats WHERE id = $1 FOR UPDATE NOWAIT", other["id"])
        waiting = asyncio.create_task(
            conn.execute("UPDATE chats SET title = 'x' WHERE id = $1", chat["id"])
        )
        async with asyncpg.create_pool(database_url, min_size=1, max_size=1) as observer:
            await wait_for(
                lambda: observer.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    holder.get_server_pid(),
                ),
                message="the update waits on the lock",
            )
            async with observer.acquire() as observer_conn:
                assert await lock_waiters(observer_conn, holder) == 1
        assert not waiting.done()
    async with asyncio.timeout(10):
        await waiting
