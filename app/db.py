"""The data-access plumbing: named SQL blocks loaded once from sql/queries/, the connection
pool, and the conversion of driver errors into chatd's typed errors.

Only modules that own a table's SQL (chats.py, replica_store.py, ...) run queries; everything
else calls them."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from app.paths import QUERIES_DIR, sql_files

# What a query function accepts: a plain connection or one borrowed from the pool.
Conn = asyncpg.Connection | PoolConnectionProxy

_HEADER = re.compile(r"^--\s*name:\s*(?P<name>[a-z_][a-z0-9_]*)\s*(?P<kind>:[a-z]+)?\s*$")


@dataclass(frozen=True)
class Query:
    name: str
    kind: str  # ":one", ":many", ":exec", ... as written in the header; documentation only
    sql: str
    source: str


class Queries:
    """Named SQL blocks: `-- name: runs_acquire :many` starts a block that ends at the next
    header. Loaded once at import; a duplicate name anywhere is an error."""

    def __init__(self, queries: dict[str, Query]) -> None:
        self._queries = queries

    @classmethod
    def load(cls, directory: Traversable = QUERIES_DIR) -> Queries:
        queries: dict[str, Query] = {}
        for path in sql_files(directory):
            for query in _parse(path):
                if query.name in queries:
                    raise ValueError(
                        f"query {query.name!r} is defined in {queries[query.name].source}"
                        f" and {query.source}"
                    )
                queries[query.name] = query
        return cls(queries)

    def names(self) -> list[str]:
        return sorted(self._queries)

    def sql(self, name: str) -> str:
        """The SQL text of a named block; a typo fails loudly at the call site."""
        try:
            return self._queries[name].sql
        except KeyError:
            raise KeyError(f"no query named {name!r} in sql/queries/") from None


@functools.cache
def project_queries() -> Queries:
    """sql/queries/ parsed once per process and shared by every room that runs SQL."""
    return Queries.load()


def _parse(path: Traversable) -> list[Query]:
    queries: list[Query] = []
    name: str | None = None
    kind = ""
    lines: list[str] = []

    def flush() -> None:
        if name is not None:
            body = "\n".join(lines).strip()
            if not body:
                raise ValueError(f"query {name!r} in {path} is empty")
            queries.append(Query(name=name, kind=kind, sql=body, source=path.name))

    for line in path.read_text(encoding="utf-8").splitlines():
        header = _HEADER.match(line)
        if header:
            flush()
            name, kind, lines = header["name"], header["kind"] or ":exec", []
        elif name is not None:
            lines.append(line)
    flush()
    return queries


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
) -> asyncpg.Pool:
    """A pool whose connections carry the replica's bounds (see `connect`)."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=CONNECT_TIMEOUT_S,
        command_timeout=COMMAND_TIMEOUT_S,
        server_settings=KEEPALIVE_SERVER_SETTINGS | (server_settings or {}),
        init=_init_pooled,
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


async def _init_pooled(conn: asyncpg.Connection) -> None:
    _tune_socket(conn)


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


@asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[Conn]:
    """A pooled connection inside one transaction. asyncpg shields the release from
    cancellation, so a cancelled caller never leaks a connection mid-transaction."""
    async with pool.acquire() as conn, conn.transaction():
        yield conn


class DbFailure(enum.Enum):
    """What a database error means for the caller (docs/reliability.md, "Database errors")."""

    # The server or the path to it is gone or going: restart, crash, failover, a cut or
    # black-holed network, a connection the server closed. Transient everywhere: retry,
    # reconnect or requeue; never end a chat in `error`, never stop a replica for it.
    OUTAGE = "outage"
    # The statement lost a race it may win next time: deadlock, serialization failure, lock
    # or statement timeout. Retried.
    CONTENTION = "contention"
    # Anything else the database refused (a constraint, bad data, a missing relation): a bug
    # or a poison input. Retrying the same thing gives the same answer.
    BUG = "bug"


# SQLSTATE classes and codes that mean "the server cannot serve this connection right now".
_OUTAGE_CLASSES = frozenset({"08", "53", "57", "58", "XX"})
# Codes outside those classes after which the server closes the session.
_OUTAGE_CODES = frozenset({"25P03"})  # idle_in_transaction_session_timeout (FATAL)
# SQLSTATE codes that mean "try the same statement again".
_CONTENTION_CODES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (lock_timeout)
        "57014",  # query_canceled (statement_timeout); class 57 is otherwise an outage
    }
)


def classify_db_error(exc: BaseException) -> DbFailure | None:
    """The meaning of a database error, by SQLSTATE class and by asyncpg's connection states;
    None when `exc` did not come from talking to the database at all.

    Besides server errors, an outage shows up as: asyncpg's `InterfaceError` (connection closed,
    pool closing), `InternalClientError` ("cannot switch to state ...; another operation is in
    progress": a pooled connection whose server sent FATAL mid-operation), socket errors, and
    `TimeoutError` from a deadline on a database wait (a black-holed network never answers)."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        if sqlstate in _CONTENTION_CODES:
            return DbFailure.CONTENTION
        if sqlstate[:2] in _OUTAGE_CLASSES or sqlstate in _OUTAGE_CODES:
            return DbFailure.OUTAGE
        return DbFailure.BUG
    if isinstance(
        exc,
        (
            asyncpg.exceptions.InterfaceError,
            asyncpg.exceptions.InternalClientError,
            ConnectionError,
            OSError,
            TimeoutError,
        ),
    ):
        return DbFailure.OUTAGE
    return None


def is_outage(exc: BaseException) -> bool:
    """The database (or the way to it) is gone for now."""
    return classify_db_error(exc) is DbFailure.OUTAGE


def is_transient(exc: BaseException) -> bool:
    """Database trouble that may pass (an outage or contention), as opposed to a bug."""
    return classify_db_error(exc) in (DbFailure.OUTAGE, DbFailure.CONTENTION)


def dsn_with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database (works for socket DSNs too)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))
