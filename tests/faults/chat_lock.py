"""A lock held on a chat row: what a user flooding POST /messages at their own chat, a slow
admin query or a stuck transaction does to everyone who needs that row."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from app.db.queries import Conn

LOCK_CLAUSES = {"update": "FOR UPDATE", "no key update": "FOR NO KEY UPDATE", "share": "FOR SHARE"}


@asynccontextmanager
async def chat_row_locked(
    dsn: str, chat_id: uuid.UUID, *, mode: str = "update"
) -> AsyncIterator[asyncpg.Connection]:
    """Hold `SELECT ... FOR UPDATE` (or `mode`) on the chat's row in an open transaction of a
    connection of its own until the block exits; the transaction then rolls back. The lock is
    taken when the block is entered (the row must exist). Yields the connection, e.g. to read
    `pg_backend_pid()` or to check who waits on it."""
    clause = LOCK_CLAUSES[mode]
    conn = await asyncpg.connect(dsn)
    try:
        transaction = conn.transaction()
        await transaction.start()
        try:
            locked = await conn.fetchval(
                f"SELECT id FROM chats WHERE id = $1 {clause}", chat_id, timeout=30
            )
            if locked is None:
                raise LookupError(f"chat {chat_id} does not exist")
            yield conn
        finally:
            if not conn.is_closed():
                await transaction.rollback()
    finally:
        await conn.close()


async def lock_waiters(conn: Conn, holder: asyncpg.Connection) -> int:
    """How many backends wait on a lock held by `holder`'s backend (to know the fault bites)."""
    holder_pid = holder.get_server_pid()
    count = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        holder_pid,
    )
    return int(count)
