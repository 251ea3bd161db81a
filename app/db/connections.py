"""Connections and the pool, each with the replica's deadlines and keepalives, so that no wait
on the database outlives them (docs/reliability.md, "Deadlines")."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

# Every connection of a replica is made with these bounds, so that no wait on the database
# outlives them (docs/reliability.md, "Deadlines"):
# - CONNECT_TIMEOUT_S bounds a connect, which a black-holed network never answers;
# - COMMAND_TIMEOUT_S is asyncpg's default deadline of every statement that names none, and
#   also bounds the cancel request asyncpg sends when a statement is cancelled (without it, a
#   cancelled statement on a black-holed connection would hold its pooled connection forever:
#   the pool's release waits for the cancel to finish).
CONNECT_TIMEOUT_S = 5.0


COMMAND_TIMEOUT_S = 15.0


# Server-side keepalives: the server notices a replica whose host or network vanished (a
# half-open connection) within about idle + interval x count seconds and ends its session,
# which frees the replica's liveness lock so that other replicas requeue its chats. Without
# them the kernel default (2 hours) applies. Ignored on Unix sockets.
KEEPALIVE_SERVER_SETTINGS = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "3",
    "tcp_keepalives_count": "3",
}


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """A dedicated connection (the listener's, the liveness lock's) with the replica's bounds."""
    settings = KEEPALIVE_SERVER_SETTINGS | kwargs.pop("server_settings", {})
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        conn: asyncpg.Connection = await asyncpg.connect(
            dsn,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=COMMAND_TIMEOUT_S,
            server_settings=settings,
            **kwargs,
        )
    _tune_socket(conn)
    return conn


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    server_settings: dict[str, str] | None = None,
    transaction_pooler: bool = False,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> asyncpg.Pool:
    """A pool whose connections carry the replica's bounds (see `connect`).

    With `transaction_pooler` (PgBouncer in transaction mode in front), consecutive transactions
    of one pooled connection may run on different server sessions, so nothing may outlive a
    transaction: no named prepared statements (asyncpg's statement cache is off; every statement
    is prepared unnamed in its own round trip) and no startup parameters (PgBouncer refuses
    unknown ones; set `idle_transaction_timeout` in PgBouncer instead, docs/operations.md)."""
    settings = KEEPALIVE_SERVER_SETTINGS | (server_settings or {})
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=CONNECT_TIMEOUT_S,
        command_timeout=COMMAND_TIMEOUT_S,
        server_settings=None if transaction_pooler else settings,
        statement_cache_size=0 if transaction_pooler else 100,
        init=functools.partial(_init_pooled, then=init),
        reset=_keep_session,
    )
    assert pool is not None
    return pool


async def drop_pool_connections(pool: asyncpg.Pool) -> None:
    """Terminate every idle connection of the pool now and have the ones in use replaced when
    they come back; the pool opens fresh ones on demand. For a replica that found the database
    unreachable: after a restart or a network cut every pooled connection is dead, and finding
    that out one deadline at a time (a statement timeout, then the cancel request's own timeout,
    per connection) would hold up recovery for tens of seconds. asyncpg has no public call for
    the idle ones (`expire_connections` alone closes each gracefully on its next acquire, which
    waits out the same deadlines), hence the holders. Connections in use are not terminated
    under their user: asyncpg's release of such a connection races with the termination."""
    await pool.expire_connections()
    for holder in getattr(pool, "_holders", ()):
        if getattr(holder, "_in_use", None) is None:
            holder.terminate()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release, which does nothing: chatd keeps no session state on pooled
    connections (LISTEN and the liveness lock have connections of their own; settings are
    transaction-local, `set_config(..., true)`; tests/db/test_queries.py checks the SQL), so
    asyncpg's default reset (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`)
    would be one wasted round trip per use of the pool. asyncpg still rolls back a
    transaction a caller left open. Measured in docs/benchmarks.md."""
    del conn


async def _init_pooled(
    conn: asyncpg.Connection, *, then: Callable[[asyncpg.Connection], Awaitable[None]] | None
) -> None:
    _tune_socket(conn)
    if then is not None:
        await then(conn)  # the caller's own hook (the round-trip benchmark counts statements)


def _tune_socket(conn: asyncpg.Connection) -> None:
    """Client-side keepalives and a TCP user timeout on TCP connections: a connection whose
    peer vanished fails on its own instead of waiting for a deadline."""
    transport = getattr(conn, "_transport", None)  # asyncpg exposes no socket options
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), 10),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), 3),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
        # Unacknowledged data for this long fails the connection (Linux).
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), 20_000),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


def dsn_with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database (works for socket DSNs too)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))
