"""Sub-agents: a chat's tools can start child chats (`parent_chat_id` = the chat), wait for
their answers, message them and close them. Children run like any chat, on any replica.

Rules: children cannot spawn children (one level keeps the tree and its costs bounded); a chat
reaches only its own children (others answer "not found"); a chat has at most `max_children`
open (not closed) children at once; Stop and archive of a parent reach its children
(app/state/chats.py). `wait` listens on the child's notifications with a deadline; it never polls in
a sleep loop.

Fencing: the tools act for the parent's run, so every write (spawn, message, close) first takes
the run's fence, in the same transaction as the write: the parent row must still say
"running, worker_id = the run's replica, generation = the run's" (`runs_lock_owned`, locked FOR
UPDATE). A run that lost its chat (edited, archived, requeued, re-acquired) gets `FencedOut`
with nothing written, and stops like on any other fenced write."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.db.listener import Listener
from app.db.queries import Conn, project_queries
from app.errors import NotFound
from app.state import chats, runs
from app.state.chats import Fence
from app.state.model import Chat, Owner
from app.state.runs import RunToken

Q = project_queries()
FINISHED = ("waiting", "error")


class SubagentError(Exception):
    """A sub-agent operation the calling chat may not do; shown to the model as a tool error."""


@dataclass(frozen=True)
class Parent:
    """The chat whose tool is running, and the token of the run it runs in."""

    chat_id: uuid.UUID
    owner: Owner
    is_child: bool
    run: RunToken


def _fence(parent: Parent) -> Fence:
    async def fence(conn: Conn) -> None:
        await runs.lock_owned(conn, parent.run)

    return fence


def _spawn_fence(parent: Parent, max_children: int) -> Fence:
    async def fence(conn: Conn) -> None:
        await runs.lock_owned(conn, parent.run)
        open_children = await conn.fetchval(Q.sql("subagents_count_open_children"), parent.chat_id)
        if open_children >= max_children:
            raise SubagentError(
                f"this chat already has {open_children} open sub-agents, the most it may have "
                f"(max_children_per_chat = {max_children}); close one with close_agent first"
            )

    return fence


async def spawn(
    pool: asyncpg.Pool,
    parent: Parent,
    prompt: str,
    title: str | None = None,
    *,
    max_children: int,
) -> Chat:
    if parent.is_child:
        raise SubagentError("sub-agents cannot spawn sub-agents")
    child, _message = await chats.create_chat(
        pool,
        parent.owner,
        prompt,
        title=title,
        parent_chat_id=parent.chat_id,
        fence=_spawn_fence(parent, max_children),
    )
    return child


async def _child(pool: asyncpg.Pool, parent: Parent, child_id: uuid.UUID) -> asyncpg.Record:
    row = await pool.fetchrow(Q.sql("subagents_get_child_chat"), child_id, parent.chat_id)
    if row is None:
        raise SubagentError(f"no sub-agent {child_id} of this chat")
    return row


async def child(pool: asyncpg.Pool, parent: Parent, child_id: uuid.UUID) -> Chat:
    """The child chat, or SubagentError when it is not a child of `parent`."""
    return Chat.from_record(await _child(pool, parent, child_id))


async def result(pool: asyncpg.Pool, child: asyncpg.Record) -> dict[str, Any]:
    answer = await pool.fetchval(Q.sql("subagents_last_assistant_text"), child["id"])
    body: dict[str, Any] = {"chat_id": str(child["id"]), "status": child["status"]}
    if child["status"] in FINISHED:
        body["answer"] = answer or ""
    if child["status"] == "error" and child["last_error"] is not None:
        body["error"] = child["last_error"]
    return body


async def wait(
    pool: asyncpg.Pool,
    listener: Listener,
    parent: Parent,
    child_id: uuid.UUID,
    *,
    timeout_s: float,
) -> dict[str, Any]:
    """Wait until the child finished its turn (waiting or error) or the deadline passed.

    The subscription is armed before the first read, so a child that finishes between the read
    and the wait still wakes us; every notification or resync triggers one re-read."""
    await _child(pool, parent, child_id)
    async with listener.subscribe(f"chat:{child_id}") as subscription:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while True:
                    child = await _child(pool, parent, child_id)
                    if child["status"] in FINISHED:
                        return await result(pool, child)
                    await subscription.get()
    child = await _child(pool, parent, child_id)
    body = await result(pool, child)
    body["timed_out"] = child["status"] not in FINISHED
    return body


async def message(
    pool: asyncpg.Pool, parent: Parent, child_id: uuid.UUID, text: str, *, queue_limit: int
) -> dict[str, Any]:
    await _child(pool, parent, child_id)
    try:
        sent = await chats.send_message(
            pool, parent.owner, child_id, text, queue_limit=queue_limit, fence=_fence(parent)
        )
    except NotFound as exc:
        raise SubagentError(str(exc)) from exc
    return {"chat_id": str(child_id), "queued": sent.queued is not None}


async def close(pool: asyncpg.Pool, parent: Parent, child_id: uuid.UUID) -> dict[str, Any]:
    await _child(pool, parent, child_id)
    closed = await chats.update_chat(
        pool, parent.owner, child_id, archived=True, fence=_fence(parent)
    )
    return {"chat_id": str(child_id), "status": closed.status, "archived": closed.archived}
