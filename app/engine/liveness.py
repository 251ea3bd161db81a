"""Replica liveness in the database: the `chat_replicas` rows and the session advisory locks
that prove a replica is alive (sql/queries/liveness.sql says the lock key scheme).

The replica (app/engine/replica.py) decides when to register, heartbeat and sweep; this room
holds what each of those does to the tables, so that every statement about replica rows is in
one place. A replica's own statements run on its dedicated liveness connection; the sweep of
other replicas runs on the pool."""

from __future__ import annotations

import os
import uuid

import asyncpg

from app.db.queries import Conn, project_queries

Q = project_queries()

# Advisory lock namespace of replica liveness locks: "chat" in ASCII (sql/queries/liveness.sql).
LIVENESS_LOCK_NAMESPACE = 0x63686174
# Attempts at finding an id whose lock key is free (a 32-bit collision is rare; two in a row
# would mean something else holds our namespace).
REGISTER_ATTEMPTS = 8
# How long a sweep waits for a chat row lock before it gives up until the next check.
SWEEP_LOCK_TIMEOUT_MS = 1000


class LivenessLost(Exception):
    """This replica can no longer prove it is alive. `outage`: because the database (or the
    way to it) is gone, as opposed to another replica having declared this one dead."""

    def __init__(self, reason: str, *, outage: bool) -> None:
        super().__init__(reason)
        self.outage = outage


def lock_key(replica_id: uuid.UUID) -> int:
    """The second int4 of the replica's advisory lock: its id's first 32 bits, signed."""
    return int.from_bytes(replica_id.bytes[:4], "big", signed=True)


async def register(
    conn: asyncpg.Connection, first_id: uuid.UUID, *, hostname: str, address: str | None
) -> uuid.UUID:
    """On a fresh liveness connection: take the lock of a free id, then insert the row (in that
    order: a row others can see always has its lock held while its session lives). Returns the
    id. First moves the live-part id sequence past anything a crash may have lost."""
    await conn.execute(Q.sql("liveness_advance_part_ids"))
    replica_id = await _lock_free_id(conn, first_id)
    await conn.execute(Q.sql("liveness_insert"), replica_id, hostname, os.getpid(), address)
    return replica_id


async def _lock_free_id(conn: asyncpg.Connection, candidate: uuid.UUID) -> uuid.UUID:
    """Take the liveness lock of `candidate`, or of another fresh id when its key is taken."""
    for _attempt in range(REGISTER_ATTEMPTS):
        if await conn.fetchval(Q.sql("liveness_try_lock"), candidate, LIVENESS_LOCK_NAMESPACE):
            return candidate
        candidate = uuid.uuid4()
    raise RuntimeError("could not find a free replica lock key")


async def delete_row(conn: Conn, replica_id: uuid.UUID) -> None:
    """The graceful unregister's delete, just before the liveness session ends."""
    await conn.execute(Q.sql("liveness_delete"), replica_id)


async def heartbeat(conn: asyncpg.Connection, replica_id: uuid.UUID) -> bool:
    """Refresh the row's heartbeat; False when the row is gone (another replica declared this
    one dead and requeued its chats)."""
    return await conn.fetchval(Q.sql("liveness_heartbeat"), replica_id) is not None


async def keepalive(conn: asyncpg.Connection) -> None:
    """One round trip on the liveness connection, to notice that it is dead."""
    await conn.fetchval(Q.sql("liveness_keepalive"))


async def find_gone(
    pool: asyncpg.Pool, replica_id: uuid.UUID, stale_s: float
) -> list[asyncpg.Record]:
    """Other replicas whose lock is free or whose heartbeat is older than `stale_s`, with
    `id`, `lock_free` and `stale`. One query, and the only one when every replica is alive."""
    return list(
        await pool.fetch(Q.sql("liveness_find_gone"), replica_id, LIVENESS_LOCK_NAMESPACE, stale_s)
    )


async def delete_gone(
    conn: Conn, gone_ids: list[uuid.UUID], lock_free_ids: list[uuid.UUID], stale_s: float
) -> list[uuid.UUID]:
    """In the sweep's transaction: delete the rows of replicas still gone (re-checked under the
    row lock) and return their ids. A stuck replica may hold a chat row lock in a transaction
    it cannot finish, so the transaction waits at most SWEEP_LOCK_TIMEOUT_MS for a lock and the
    sweep retries at the next check rather than wedge."""
    await conn.execute(Q.sql("liveness_sweep_lock_timeout"), f"{SWEEP_LOCK_TIMEOUT_MS}ms")
    if not gone_ids:
        return []
    rows = await conn.fetch(Q.sql("liveness_delete_gone"), gone_ids, lock_free_ids, stale_s)
    return [row["id"] for row in rows]
